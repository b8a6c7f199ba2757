"""The Ray Data engine of the batch script (``--engine ray``): label millions of files on a Ray cluster.

    python -m serving.batch --model /shared/bundles/age --input /shared/faces --output ages/ --engine ray \
        --address head-node:6379 --workers 8 --num-gpus-per-worker 1

Model actors (``Forward``) read, decode, predict and build rows with the local engine's own functions; only
paths go in and only rows come back, in input order. How a job runs, its outputs and faults: docs/BATCH.md.
Only this module imports Ray.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.bundle import META_FILE, ONNX_FILE, WEIGHTS_FILE
from serving.batch import ImageFiles, collate, label
from serving.batch_output import FatalError, to_table, write_outputs
from serving.predictor import Predictor

ROWS_PER_FILE = 65536  # a dataset part file holds whole blocks, at least this many rows (the last one fewer)
BATCHES_PER_BLOCK = 4  # input rows per block (an actor's task): this many batches


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the cluster (None: a local Ray) and the actor pool."""

    address: str | None = None
    workers: int | None = None  # None: as many actors as the cluster's CPUs (GPUs for GPU actors) hold
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


class Forward:
    """A Ray actor: the bundle's ``Predictor``; a batch of ``(file, path)`` rows -> their output rows, read,
    decoded and labelled with the local engine's ``ImageFiles``, ``collate`` and ``label``. ``args``: the
    checked options of ``python -m serving.batch``."""

    def __init__(self, files: list[Any], max_pixels: int | None, args: argparse.Namespace) -> None:
        import ray

        threads = max(1, int(args.cpus_per_worker))
        torch.set_num_threads(threads)  # ONNX Runtime's intra-op threads too (Predictor: they follow torch's)
        files = ray.get(files[0])  # the bundle's files, ``{name: bytes}``, from the object store
        folder = Path(tempfile.mkdtemp(prefix="svertka-bundle-"))  # this node's copy of the shipped bundle
        for name, data in files.items():
            (folder / name).write_bytes(data)
        try:
            self.predictor = Predictor(folder, device=args.device, max_pixels=max_pixels, runtime=args.runtime)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the weights are in memory now
        self.args = args
        self.pool = ThreadPoolExecutor(threads)  # decoding threads (PIL and OpenCV release the GIL)

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        args = self.args
        files = ImageFiles([str(f) for f in batch["file"]], self.predictor.loader, args.max_faces, args.detect)
        shown = [str(p) for p in batch["path"]]
        collated = collate(list(self.pool.map(files.__getitem__, range(len(files)))))
        return to_table(label(self.predictor, *collated, shown, args.top_k), self.predictor, args.top_k)


def connect(opts: RayOptions) -> bool:
    """Join the cluster at ``opts.address``, or start a local Ray sized for decoding + actors; True if started here."""
    import ray

    if opts.address:
        check_reachable(opts.address)
    if ray.is_initialized():  # called from a Ray driver that is already connected (e.g. the tests' session)
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": True}
    try:
        if opts.address:
            import data
            import models
            import serving

            # The cluster's Python needs svertka's dependencies; its own code travels with the job.
            ray.init(address=opts.address, runtime_env={"py_modules": [serving, data, models]}, **quiet)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil((opts.workers or 0) * opts.cpus_per_worker))
            # Ray 2.60's warning that a new local cluster uses token authentication: nothing for a user to do.
            # (Setting RAY_AUTH_MODE after `import ray` breaks the start: the driver's config is cached.)
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            # "local": a new Ray of our own, even when `ray start --head` runs on this machine
            ray.init("local", num_cpus=cpus, include_dashboard=False, object_store_memory=2 * 1024**3, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--address {opts.address}" if opts.address else "--engine ray"
        hint = ""
        if opts.address and os.environ.get("RAY_AUTH_MODE") is None:
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
    predictor: Predictor,
    bundle: Path,
    paths: Sequence[Path],
    shown: Sequence[str],
    args: argparse.Namespace,
    opts: RayOptions,
) -> Any:
    """The lazy dataset: ``(file, path)`` rows -> the actor pool (read, decode, predict) -> output rows."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order, as the local engine writes them
    ctx.enable_progress_bars = False  # the driver shows its own (files/s, ETA)
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": we know
    cwd = os.getcwd()  # absolute as given; Path.resolve stats every part (0.6 s for 19,362 files)
    items = [{"file": os.path.join(cwd, p), "path": s} for p, s in zip(paths, shown, strict=True)]
    workers = pool_size(opts)
    names = (WEIGHTS_FILE, META_FILE) + ((ONNX_FILE,) if (bundle / ONNX_FILE).is_file() else ())
    files = ray.put({name: (bundle / name).read_bytes() for name in names})  # the bundle, shipped to the actors
    # big jobs: a few batches per actor task; small ones: still spread over the pool
    per_block = max(1, min(args.batch_size * BATCHES_PER_BLOCK, math.ceil(len(items) / (2 * workers))))
    return (
        # from_items builds the blocks here; from_pandas would run a Ray task per block for its metadata
        ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_block)).map_batches(
            Forward,
            batch_size=args.batch_size,
            fn_constructor_args=([files], predictor.max_pixels, args),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=opts.cpus_per_worker,
            num_gpus=opts.gpus_per_worker or None,
            batch_format="numpy",
        )
    )


def pool_size(opts: RayOptions) -> int:
    """``--workers``, else actors that fill the cluster: its CPUs over ``--cpus-per-worker`` (GPUs over
    ``--num-gpus-per-worker``)."""
    import ray

    if opts.workers:
        return opts.workers
    key, each = ("GPU", opts.gpus_per_worker) if opts.gpus_per_worker else ("CPU", opts.cpus_per_worker)
    return max(1, int(ray.cluster_resources().get(key, 0) // each))


def run_ray(
    predictor: Predictor,
    bundle: Path,
    paths: Sequence[Path],
    shown: Sequence[str],
    outputs: Sequence[tuple[str, Path]],
    args: argparse.Namespace,
    keep_table: bool = False,
) -> tuple[pd.DataFrame | None, int, int, int]:
    """Run the job and write ``outputs`` as its blocks arrive (``write_outputs``, which says what comes back)."""
    try:
        import ray
    except ImportError:
        raise FatalError("--engine ray: Ray is not installed (pip install 'svertka[ray]')") from None
    opts = RayOptions(args.address, args.workers, args.cpus_per_worker, args.num_gpus_per_worker)
    started = connect(opts)
    bar = progress_bar(len(paths), args.progress)

    def blocks() -> Iterator[pd.DataFrame]:
        dtypes = to_table([], predictor, args.top_k).dtypes.to_dict()
        for block in pipeline(predictor, bundle, paths, shown, args, opts).iter_batches(
            batch_size=None, batch_format="pandas", prefetch_batches=2
        ):
            yield block.astype(dtypes)  # Arrow -> pandas dtypes
            bar.update(len(block))

    try:
        return write_outputs(blocks(), outputs, ROWS_PER_FILE, keep_table)
    except ray.exceptions.RayError as e:
        raise FatalError(f"--engine ray: the job failed ({str(e).strip().splitlines()[0]})") from None
    finally:
        bar.close()
        if started:
            ray.shutdown()


def progress_bar(total: int, progress: bool | None) -> Any:
    """The driver's progress bar: files done, files/s and ETA (on a TTY unless ``progress`` says)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="predicting (ray)", disable=None if progress is None else not progress)
