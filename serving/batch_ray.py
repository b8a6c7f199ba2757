"""The Ray Data engine of the batch script: label millions of files on a Ray cluster.

    python -m serving.batch --model utkface_age:latest --input faces.csv --output ages/ --engine ray
    python -m serving.batch --model /shared/bundles/age --input /shared/faces --output ages.parquet \
        --engine ray --address head-node:6379 --workers 8 --num-gpus-per-worker 1

``serving.batch`` checks the options, lists the inputs and loads the bundle on the driver, then
calls ``run_ray``. The pipeline is a Ray Data dataset of ``(file, path)`` rows (``from_items``):
reading and decoding run as parallel Ray tasks (``serving.batch_decode.decode_files``, numpy and
PIL only, so those workers start without torch; for a face model also detecting and aligning each
face with ``data.faces``, numpy + dlib, on the full-resolution image), the bundle's preprocessing
and the forward run in a pool of ``--workers`` actors (``Forward``), each holding one
``serving.predictor.Predictor`` and building its rows with ``serving.batch_output.build_rows``/``to_table``,
so both engines write the same columns.
The bundle's files travel through Ray's object store, so actors on other machines need no copy of
it; the input files must be readable at the same path on every node (a shared file system).

Faults: Ray Data's actor pool restarts a dead actor and runs the batches it held again (its
defaults ``max_restarts=-1``, ``max_task_retries=-1``; decoding tasks are retried too); the
driver receives each block once, in input order (``preserve_order``), and streams it into the
outputs' temporary names, renamed at the end.

Without ``--address`` a local Ray starts with as many logical CPUs as this machine has cores, for
the decoding tasks, plus ``--workers x --cpus-per-worker`` for the actors: Ray Data's actor pool
and its read tasks must not compete for the same CPU budget, or the job can stall (Ray 2.60 with
``num_cpus=2`` and a pool of 2 waits forever on a 2-core machine). Only this module imports Ray.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch

from data.imagefile import ImageError
from data.preprocess import normalize_ops
from models.bundle import META_FILE, ONNX_FILE, WEIGHTS_FILE
from serving.batch_decode import decode_files
from serving.batch_output import (
    FatalError,
    build_rows,
    error_counts,
    is_dataset,
    remove,
    temp_name,
    to_table,
    write_outputs,
)
from serving.predictor import Predictor

ROWS_PER_FILE = 65536  # a dataset part file holds whole blocks, at least this many rows (the last one fewer)
BATCHES_PER_BLOCK = 4  # input rows per block: a decoding task reads this many batches
DECODE_MEMORY = 512 * 1024**2  # bytes of memory a decoding task asks Ray for (its batches of decoded images)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the cluster (None: a local Ray) and the actor pool."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    optimize: bool = True  # CPU actors: TorchScript forward when it matches the model (Predictor(optimize=))
    runtime: str = "auto"  # onnx, torch, or auto: ONNX Runtime on CPU actors when the bundle has model.onnx


class Forward:
    """A Ray actor: the bundle's ``Predictor``; a decoded batch -> its output rows."""

    def __init__(
        self,
        files: list[Any],
        device: str,
        max_pixels: int | None,
        top_k: int,
        threads: int,
        optimize: bool = False,
        runtime: str = "auto",
    ) -> None:
        import ray

        torch.set_num_threads(threads)  # ONNX Runtime's intra-op threads too (Predictor: they follow torch's)
        files = ray.get(files[0])  # the bundle's files, ``{name: bytes}``, from the object store
        folder = Path(tempfile.mkdtemp(prefix="svertka-bundle-"))  # this node's copy of the shipped bundle
        for name, data in files.items():
            (folder / name).write_bytes(data)
        try:
            self.predictor = Predictor(folder, device=device, max_pixels=max_pixels, optimize=optimize, runtime=runtime)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the weights are in memory now
        self.top_k = top_k
        self.loader = self.predictor.loader.preprocess
        normalize = A.Compose(normalize_ops(self.predictor.spec))
        self.normalize = lambda image: normalize(image=image)["image"].float()

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        errors = [str(e) or None for e in batch["error"]]
        inputs: dict[int, torch.Tensor] = {}  # per good file: its inputs (K, C, h, w), K faces or 1 image
        for j, (images, resized) in enumerate(zip(batch["images"], batch["resized"], strict=True)):
            if errors[j] is None and len(images):
                try:  # the bundle's preprocessing (its resize already done for a large image)
                    prep = self.normalize if resized else self.loader
                    inputs[j] = torch.stack([prep(np.asarray(image)) for image in images])
                except ImageError as e:
                    errors[j] = str(e)
        out = self.predictor.predict_tensors(torch.cat(list(inputs.values()))) if inputs else None
        rows, at = [], 0
        for j, path in enumerate(batch["path"]):
            n = len(inputs[j]) if j in inputs else 0
            outputs = None if errors[j] is not None else out[at : at + n] if n else torch.zeros(0)
            faces = [
                {"box": [int(v) for v in box], "score": None if np.isnan(score) else float(score)}
                for box, score in zip(np.asarray(batch["box"][j]).reshape(-1, 4), batch["score"][j], strict=True)
            ]
            rows += build_rows(self.predictor, str(path), outputs, errors[j], self.top_k, faces)
            at += n
        return to_table(rows, self.predictor, self.top_k)


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
            cpus = (os.cpu_count() or 1) + math.ceil(opts.workers * opts.cpus_per_worker)
            # Ray 2.60 turns token authentication on for a new local cluster (unless RAY_AUTH_MODE
            # says otherwise) and logs a warning saying so: nothing for a user to do here. (Setting
            # RAY_AUTH_MODE after `import ray` breaks the start: the driver's config is cached.)
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


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """The bundle's files (weights, metadata, ``model.onnx`` when it has one), to ship to the actors through the
    object store."""
    names = (WEIGHTS_FILE, META_FILE) + ((ONNX_FILE,) if (bundle / ONNX_FILE).is_file() else ())
    return {name: (bundle / name).read_bytes() for name in names}


def pipeline(
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
) -> Any:
    """The lazy dataset: ``(file, path)`` rows -> decoding tasks -> the actor pool -> output rows."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order, as the local engine writes them
    ctx.enable_progress_bars = False  # the driver shows its own (files/s, ETA)
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": we know
    items = [{"file": str(p.resolve()), "path": s} for p, s in zip(paths, shown, strict=True)]
    per_block = min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(items) / (2 * (os.cpu_count() or 1))))
    per_block = max(1, per_block)  # big jobs: a few batches per decoding task; small ones: still parallel
    threads = max(1, int(opts.cpus_per_worker))
    return (
        # from_items builds the blocks here; from_pandas would run a Ray task per block for its metadata
        ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_block))
        .map_batches(
            decode_files,
            batch_size=batch_size,
            fn_kwargs={
                "spec": predictor.spec.to_dict(),
                "max_pixels": predictor.max_pixels,
                "aligner": predictor.loader.aligner if detect else None,
                "max_faces": max_faces,
            },
            num_cpus=1,
            # A memory request of their own also keeps Ray Data from fusing the decoding into the
            # actors (it fuses a task into an actor pool with the same resources): decoding stays
            # in parallel tasks, off the actors' (GPUs') CPUs.
            memory=DECODE_MEMORY,
        )
        .map_batches(
            Forward,
            batch_size=batch_size,
            fn_constructor_args=(
                [ray.put(bundle_files(bundle))],
                device,
                predictor.max_pixels,
                top_k,
                threads,
                opts.optimize,
                opts.runtime,
            ),
            compute=ray.data.ActorPoolStrategy(size=opts.workers),
            num_cpus=opts.cpus_per_worker,
            num_gpus=opts.gpus_per_worker or None,
            batch_format="numpy",
        )
    )


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
            ds = pipeline(predictor, bundle, paths, shown, batch_size, top_k, device, opts, detect, max_faces)
            for block in ds.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=2):
                block = block.astype(to_table([], predictor, top_k).dtypes.to_dict())  # Arrow -> pandas dtypes
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
