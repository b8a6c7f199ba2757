"""The Ray engine of the batch script (``--engine ray``): label millions of files on a Ray cluster.

Plain Ray actors (``Forward``, the local engine's own functions) fed blocks of paths by the driver, rows back in
input order; not Ray Data, whose three service actors and pyarrow imports cost 4-5 s of a 2-core start. How a job
runs, its outputs and faults: docs/BATCH.md. Only this module and ``serving.ray_start`` import Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from models.bundle import META_FILE, ONNX_FILE, WEIGHTS_FILE
from serving.batch import ImageFiles, collate, label
from serving.batch_output import FatalError, to_table, write_outputs
from serving.predictor import Predictor
from serving.ray_start import QUIET, init_local, local_cpus, shutdown, take_early

ROWS_PER_FILE = 65536  # a dataset part file holds whole blocks, at least this many rows (the last one fewer)
BATCHES_PER_BLOCK = 4  # input rows per block (an actor's task): this many batches
IN_FLIGHT = 2  # blocks given to each actor at a time: one to run, one waiting (its inputs already there)


class Forward:
    """A Ray actor holding the bundle's ``Predictor``: a block of files -> their output rows, with the local engine's
    ``ImageFiles``, ``collate`` and ``label``. ``args``: the checked options of ``python -m serving.batch``."""

    def __init__(self, files: list[Any], args: argparse.Namespace) -> None:
        import ray

        threads = max(1, int(args.cpus_per_worker))
        torch.set_num_threads(threads)  # ONNX Runtime's intra-op threads too (Predictor: they follow torch's)
        with tempfile.TemporaryDirectory(prefix="svertka-bundle-", ignore_cleanup_errors=True) as tmp:
            folder = Path(tmp)  # this node's copy of the shipped bundle (``{name: bytes}`` in the object store)
            for name, data in ray.get(files[0]).items():
                (folder / name).write_bytes(data)
            self.predictor = Predictor(folder, device=args.device, max_pixels=args.max_pixels, runtime=args.runtime)
        self.args = args
        self.pool = ThreadPoolExecutor(threads)  # decoding threads (PIL and OpenCV release the GIL)

    def __call__(self, files: list[str], shown: list[str]) -> pd.DataFrame:
        """One block: ``files`` (absolute paths) shown as ``shown`` -> their rows, ``--batch-size`` at a time."""
        args, rows = self.args, []
        for at in range(0, len(files), args.batch_size):
            read = ImageFiles(files[at : at + args.batch_size], self.predictor.loader, args.max_faces, args.detect)
            collated = collate(list(self.pool.map(read.__getitem__, range(len(read)))))
            rows += label(self.predictor, *collated, shown[at : at + args.batch_size], args.top_k)
        return to_table(rows, self.predictor, args.top_k)


def connect(args: argparse.Namespace) -> bool:
    """Join the cluster at ``--address``, or start a local Ray sized for the actors (or take the one
    ``serving.ray_start`` started as the script began); True if started here."""
    import ray

    if args.address:
        check_reachable(args.address)
    cpus = local_cpus(args.workers, args.cpus_per_worker)
    early = None if args.address else take_early(cpus)
    if early is None and ray.is_initialized():  # a Ray driver already connected (e.g. the tests' session)
        return False
    try:
        if args.address:
            import data
            import models
            import serving

            # The cluster's Python needs svertka's dependencies; its own code travels with the job.
            ray.init(address=args.address, runtime_env={"py_modules": [serving, data, models]}, **QUIET)
        elif early is not None:
            early.result()  # started while the script imported and listed its inputs; its error, if any
        else:
            init_local(cpus)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--address {args.address}" if args.address else "--engine ray"
        hint = ""
        if args.address and os.environ.get("RAY_AUTH_MODE") is None:
            hint = "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and copy its ~/.ray/auth_token"
        raise FatalError(f"{where}: cannot start or join Ray ({str(e).splitlines()[0]}){hint}") from None
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """``host:port``: ``FatalError`` at once if nothing listens there (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():  # "auto", ray://..., or a form Ray checks itself
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise FatalError(f"--address {address}: no Ray head answers there ({e.strerror or e})") from None


def pipeline(
    bundle: Path, paths: Sequence[Path], shown: Sequence[str], args: argparse.Namespace, bar: Any
) -> Iterator[pd.DataFrame]:
    """The output rows, one block (``--batch-size x BATCHES_PER_BLOCK`` files) at a time, in input order, each
    counted on ``bar`` once taken: the blocks go to the actor pool, each actor kept ``IN_FLIGHT`` blocks deep."""
    import ray

    cwd = os.getcwd()  # absolute as given; Path.resolve stats every part (0.6 s for 19,362 files)
    files = [os.path.join(cwd, p) for p in paths]
    workers = pool_size(args)
    names = (WEIGHTS_FILE, META_FILE) + ((ONNX_FILE,) if (bundle / ONNX_FILE).is_file() else ())
    shipped = ray.put({name: (bundle / name).read_bytes() for name in names})  # the bundle, shipped to the actors
    # big jobs: a few batches per actor task; small ones: still spread over the pool
    per_block = max(1, min(args.batch_size * BATCHES_PER_BLOCK, math.ceil(len(files) / (2 * workers))))
    actor = ray.remote(Forward).options(
        num_cpus=args.cpus_per_worker,
        num_gpus=args.num_gpus_per_worker or None,
        max_restarts=-1,  # a dead actor comes back and runs again the blocks it held
        max_task_retries=-1,
    )
    pool = [actor.remote([shipped], args) for _ in range(workers)]  # in a list: the actor fetches it
    todo = iter(range(0, len(files), per_block))  # each block's first file
    running: dict[Any, tuple[int, Any]] = {}  # result ref -> (its block's first file, its actor)
    done: dict[int, Any] = {}  # finished out of order, waiting for an earlier block
    wanted = 0

    def submit(worker: Any) -> None:
        if (at := next(todo, None)) is not None:
            ref = worker.__call__.remote(files[at : at + per_block], list(shown[at : at + per_block]))
            running[ref] = (at, worker)

    for worker in pool:
        for _ in range(IN_FLIGHT):
            submit(worker)
    while running or done:
        while wanted in done:
            block = ray.get(done.pop(wanted))
            yield block
            bar.update(len(block))
            wanted += per_block
        if running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            at, worker = running.pop(ref)
            done[at] = ref
            submit(worker)


def pool_size(args: argparse.Namespace) -> int:
    """``--workers``, else actors that fill the cluster: its CPUs over ``--cpus-per-worker`` (GPUs over
    ``--num-gpus-per-worker``)."""
    import ray

    if args.workers:
        return args.workers
    key, each = ("GPU", args.num_gpus_per_worker) if args.num_gpus_per_worker else ("CPU", args.cpus_per_worker)
    return max(1, int(ray.cluster_resources().get(key, 0) // each))


def run_ray(
    bundle: Path,
    paths: Sequence[Path],
    shown: Sequence[str],
    outputs: Sequence[tuple[str, Path]],
    args: argparse.Namespace,
) -> tuple[pd.DataFrame | None, int, int, int]:
    """Run the job and write ``outputs`` as its blocks arrive (``write_outputs``, which says what comes back; the
    whole table kept for ``--truth``)."""
    try:
        import ray
    except ImportError:
        raise FatalError("--engine ray: Ray is not installed (pip install 'svertka[ray]')") from None
    started = connect(args)
    bar = progress_bar(len(paths), args.progress)
    try:
        return write_outputs(pipeline(bundle, paths, shown, args, bar), outputs, ROWS_PER_FILE, bool(args.truth))
    except ray.exceptions.RayError as e:
        raise FatalError(f"--engine ray: the job failed ({str(e).strip().splitlines()[0]})") from None
    finally:
        bar.close()
        if started:
            shutdown()


def progress_bar(total: int, progress: bool | None) -> Any:
    """The driver's progress bar: files done, files/s and ETA (on a TTY unless ``progress`` says)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="predicting (ray)", disable=None if progress is None else not progress)
