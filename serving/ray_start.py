"""The Ray engine's local Ray, started in a thread the moment ``python -m serving.batch --engine ray`` runs: its
~4 s (2 cores) of waiting for Ray's own processes then fills with the script importing torch, reading its inputs
and loading the bundle. Standard library only until ``import ray``; ``serving.batch_ray.connect`` takes it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future

_early: Future | None = None  # the local Ray being started, until connect takes it
QUIET = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": True}  # every ray.init


def local_cpus(workers: int | None, cpus_per_worker: float) -> int:
    """Logical CPUs of a local Ray: this machine's cores, more if ``workers x cpus_per_worker`` asks for more."""
    return max(os.cpu_count() or 1, math.ceil((workers or 0) * cpus_per_worker))


def init_local(cpus: int) -> None:
    """``ray.init`` of a new local Ray of our own (even when ``ray start --head`` runs on this machine), quiet."""
    import ray

    # Ray 2.60 turns token authentication on for a new local cluster and warns so: nothing for a user to do here.
    # (Setting RAY_AUTH_MODE after `import ray` breaks the start: the driver's config is cached.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray._private.worker").setLevel(logging.ERROR)  # "SIGTERM handler is not set": set below
    ray.init("local", num_cpus=cpus, include_dashboard=False, object_store_memory=2 * 1024**3, **QUIET)


def start_early(argv: Sequence[str]) -> None:
    """Start ``init_local`` in a thread when ``argv`` asks for ``--engine ray`` without ``--address``."""
    global _early
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)  # errors: the batch script's parser says them
    p.add_argument("--engine")
    p.add_argument("--address")
    p.add_argument("--workers", type=int)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    try:
        args, _ = p.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit, ValueError):
        return
    if args.engine != "ray" or args.address or (args.workers or 0) < 0 or args.cpus_per_worker <= 0:
        return
    try:
        import ray  # noqa: F401  (before the thread: importing it there would hold the import lock)
    except ImportError:
        return  # connect says so
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # what ray.init sets, from the main thread only
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    cpus = local_cpus(args.workers, args.cpus_per_worker)
    future: Future = Future()

    def run() -> None:
        try:
            init_local(cpus)
        except BaseException as e:  # noqa: B036  (handed to the main thread, which raises it)
            future.set_exception(e)
            return
        future.set_result(cpus)
        # Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): it stays till the process ends.
        threading.Event().wait()

    threading.Thread(target=run, name="ray-init", daemon=True).start()
    _early = future


def take_early(cpus: int) -> Future | None:
    """The early start if it was asked for ``cpus`` CPUs (connect's sizing), else None (one sized otherwise: stops)."""
    global _early
    future, _early = _early, None
    if future is not None and future.exception() is None and future.result() != cpus:
        shutdown()
        return None
    return future


def shutdown() -> None:
    """``ray.shutdown``, 1 s sooner: Ray 2.60 stops the GCS first, and the autoscaler monitor's SIGTERM handler waits on
    it until Ray SIGKILLs it 1 s later. A local Ray has nothing to autoscale: its monitor is killed first."""
    import ray

    with contextlib.suppress(AttributeError):  # no public handle on Ray's processes; a Ray without it: plain shutdown
        ray._private.worker._global_node.kill_monitor(check_alive=False)  # joined with --address: no monitor of ours
    ray.shutdown()


def stop_unused() -> None:
    """Stop an early Ray that no job took (a bad option): no start asks for 0 CPUs."""
    take_early(0)
