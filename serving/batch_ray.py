"""The Ray engine of the batch script: label millions of files on a Ray cluster.

    python -m serving.batch --model utkface_age:latest --input faces.csv --output ages/ --engine ray
    python -m serving.batch --model /shared/bundles/age --input /shared/faces --output ages.parquet \
        --engine ray --address head-node:6379 --workers 8 --num-gpus-per-worker 1

``serving.batch`` checks the options, lists the inputs and loads the bundle on the driver, then
calls ``run_ray``. The job is cut into blocks of ``(file, path)`` rows handed to a pool of Ray
actors (``Forward``; ``--workers``, default as many as the cluster's CPUs hold), each kept two blocks
deep: each actor holds one ``serving.predictor.Predictor`` and reads, decodes (faces: detects and
aligns), predicts and builds the rows of its blocks with the local engine's own functions, so only
paths travel to the actors and only rows come back. The bundle's files travel through Ray's object
store, so actors on other machines need no copy of it; the input files must be readable at the same
path on every node (a shared file system). Plain Ray actors, not Ray Data: Ray Data starts three
service actors of its own and imports pyarrow everywhere, 4-5 s of a 2-core machine's start-up.

Faults: a dead actor is restarted and runs again the blocks it held (``max_restarts=-1``,
``max_task_retries=-1``); the driver takes each block once, in input order, and streams it into the
outputs' temporary names, renamed at the end.
Without ``--address`` a local Ray starts with as many logical CPUs as this machine has cores (more
if ``--workers x --cpus-per-worker`` asks for more), in a thread as soon as the script runs
(``serving.ray_start``). Only this module and that one import Ray.
"""

from __future__ import annotations

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

import pandas as pd
import torch

from models.bundle import META_FILE, ONNX_FILE, WEIGHTS_FILE
from serving.batch import ImageFiles, collate, label
from serving.batch_output import (
    FatalError,
    error_counts,
    is_dataset,
    remove,
    temp_name,
    to_table,
    write_outputs,
)
from serving.predictor import Predictor
from serving.ray_start import init_local, local_cpus, take_early

ROWS_PER_FILE = 65536  # a dataset part file holds whole blocks, at least this many rows (the last one fewer)
BATCHES_PER_BLOCK = 4  # input rows per block (an actor's task): this many batches
IN_FLIGHT = 2  # blocks given to each actor at a time: one to run, one waiting (its inputs already there)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the cluster (None: a local Ray) and the actor pool."""

    address: str | None = None
    workers: int | None = None  # None: as many actors as the cluster's CPUs (GPUs for GPU actors) hold
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    runtime: str = "auto"  # onnx, torch, or auto: ONNX Runtime on CPU actors when the bundle has model.onnx


class Forward:
    """A Ray actor: the bundle's ``Predictor``; a batch of ``(file, path)`` rows -> their output rows, read,
    decoded and labelled with the local engine's ``ImageFiles``, ``collate`` and ``label``."""

    def __init__(
        self,
        files: list[Any],
        device: str,
        max_pixels: int | None,
        top_k: int,
        threads: int,
        runtime: str = "auto",
        detect: bool = True,
        max_faces: int | None = None,
    ) -> None:
        import ray

        torch.set_num_threads(threads)  # ONNX Runtime's intra-op threads too (Predictor: they follow torch's)
        files = ray.get(files[0])  # the bundle's files, ``{name: bytes}``, from the object store
        folder = Path(tempfile.mkdtemp(prefix="svertka-bundle-"))  # this node's copy of the shipped bundle
        for name, data in files.items():
            (folder / name).write_bytes(data)
        try:
            self.predictor = Predictor(folder, device=device, max_pixels=max_pixels, runtime=runtime)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the weights are in memory now
        self.top_k, self.detect, self.max_faces = top_k, detect, max_faces
        self.pool = ThreadPoolExecutor(threads)  # decoding threads (PIL and OpenCV release the GIL)

    def __call__(self, files: list[str], shown: list[str], batch_size: int) -> pd.DataFrame:
        """One block: ``files`` (absolute paths) shown as ``shown`` -> their output rows, ``batch_size`` at a time."""
        rows = []
        for at in range(0, len(files), batch_size):
            read = ImageFiles(files[at : at + batch_size], self.predictor.loader, self.max_faces, self.detect)
            items = collate(list(self.pool.map(read.__getitem__, range(len(read)))))
            rows += label(self.predictor, *items, shown[at : at + batch_size], self.top_k)
        return to_table([r for per_file in rows for r in per_file], self.predictor, self.top_k)


def connect(opts: RayOptions) -> bool:
    """Join the cluster at ``opts.address``, or start a local Ray sized for the actors (or take the one
    ``serving.ray_start`` started as the script began); True if started here."""
    import ray

    if opts.address:
        check_reachable(opts.address)
    cpus = local_cpus(opts.workers, opts.cpus_per_worker)
    early = None if opts.address else take_early(cpus)
    if early is None and ray.is_initialized():  # a Ray driver already connected (e.g. the tests' session)
        return False
    try:
        if opts.address:
            import data
            import models
            import serving

            # The cluster's Python needs svertka's dependencies; its own code travels with the job.
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": True}
            ray.init(address=opts.address, runtime_env={"py_modules": [serving, data, models]}, **quiet)
        elif early is not None:
            early.result()  # started while the script imported and listed its inputs; its error, if any
        else:
            init_local(cpus)
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


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """The bundle's files (weights, metadata, ``model.onnx`` when it has one), to ship to the actors through the
    object store."""
    names = (WEIGHTS_FILE, META_FILE) + ((ONNX_FILE,) if (bundle / ONNX_FILE).is_file() else ())
    return {name: (bundle / name).read_bytes() for name in names}


def blocks(
    predictor: Predictor,
    bundle: Path,
    paths: Sequence[Path],
    shown: Sequence[str],
    batch_size: int,
    top_k: int,
    device: str,
    opts: RayOptions,
    detect: bool = True,
    max_faces: int | None = None,
) -> Iterator[pd.DataFrame]:
    """The output rows, one block (``batch_size x BATCHES_PER_BLOCK`` files) at a time, in input order: the blocks
    go to the actor pool (read, decode, predict), each actor kept ``IN_FLIGHT`` blocks deep."""
    import ray

    cwd = os.getcwd()  # absolute as given; Path.resolve stats every part (0.6 s for 19,362 files)
    files = [os.path.join(cwd, p) for p in paths]
    workers = pool_size(opts)
    # big jobs: a few batches per actor task; small ones: still spread over the pool
    per_block = max(1, min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(files) / (2 * workers))))
    starts = range(0, len(files), per_block)
    actor = ray.remote(Forward).options(
        num_cpus=opts.cpus_per_worker,
        num_gpus=opts.gpus_per_worker or None,
        max_restarts=-1,  # a dead actor comes back and runs again the blocks it held
        max_task_retries=-1,
    )
    args = (device, predictor.max_pixels, top_k, max(1, int(opts.cpus_per_worker)), opts.runtime, detect, max_faces)
    shipped = [ray.put(bundle_files(bundle))]  # in a list: the actor fetches it (a bare ref would be resolved first)
    pool = [actor.remote(shipped, *args) for _ in range(workers)]
    todo = iter(enumerate(starts))
    running: dict[Any, tuple[int, Any]] = {}  # result ref -> (block index, actor)
    done: dict[int, Any] = {}  # finished out of order, waiting for an earlier block
    wanted = 0

    def submit(worker: Any) -> None:
        if (job := next(todo, None)) is not None:
            i, at = job
            ref = worker.__call__.remote(files[at : at + per_block], list(shown[at : at + per_block]), batch_size)
            running[ref] = (i, worker)

    for worker in pool:
        for _ in range(IN_FLIGHT):
            submit(worker)
    while running or done:
        while wanted in done:
            yield ray.get(done.pop(wanted))
            wanted += 1
        if running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, worker = running.pop(ref)
            done[i] = ref
            submit(worker)


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
    batch_size: int,
    top_k: int,
    device: str,
    opts: RayOptions,
    progress: bool | None = None,
    keep_table: bool = False,
    detect: bool = True,
    max_faces: int | None = None,
) -> tuple[pd.DataFrame | None, int, int, int]:
    """Run the job and write ``outputs`` atomically -> (the whole table if kept, rows, unreadable, faceless).

    The table is kept on the driver only when a single-file output or ``keep_table`` needs it;
    dataset folders receive the blocks as they arrive.
    """
    try:
        import ray
    except ImportError:
        raise FatalError("--engine ray: Ray is not installed (pip install 'svertka[ray]')") from None
    started = connect(opts)
    folders = [temp_name(out) for spec, out in outputs if is_dataset(spec)]
    keep = keep_table or any(not is_dataset(spec) for spec, _ in outputs)
    try:
        for folder in folders:
            folder.mkdir()
        frames, pending, parts, rows, bad, faceless = [], [], 0, 0, 0, 0
        bar = progress_bar(len(paths), progress)

        def flush() -> None:
            nonlocal parts, pending
            if pending and folders:
                part = pd.concat(pending, ignore_index=True)
                for folder in folders:
                    part.to_parquet(folder / f"part-{parts:05d}.parquet", index=False)
                parts += 1
            pending = []

        try:
            for block in blocks(predictor, bundle, paths, shown, batch_size, top_k, device, opts, detect, max_faces):
                counts = error_counts(block)
                rows, bad, faceless = rows + len(block), bad + counts[0], faceless + counts[1]
                if keep:
                    frames.append(block)
                pending.append(block)
                if sum(len(f) for f in pending) >= ROWS_PER_FILE:
                    flush()
                bar.update(len(block))
            flush()
        except ray.exceptions.RayError as e:
            raise FatalError(f"--engine ray: the job failed ({str(e).strip().splitlines()[0]})") from None
        finally:
            bar.close()
        table = pd.concat(frames, ignore_index=True) if keep else None
        write_outputs(table, outputs, prewritten=folders)
    except BaseException:
        for folder in folders:
            remove(folder)
        raise
    finally:
        if started:
            ray.shutdown()
    return table, rows, bad, faceless


def progress_bar(total: int, progress: bool | None) -> Any:
    """The driver's progress bar: files done, files/s and ETA (on a TTY unless ``progress`` says)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="predicting (ray)", disable=None if progress is None else not progress)
