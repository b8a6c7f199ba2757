"""Label a folder, CSV or glob of images offline with a bundle; write one CSV/Parquet row per input.

    python -m serving.batch --model utkface_age:latest --input 'faces/**/*.jpg' --output ages.parquet
    python -m serving.batch --model artifacts/utkface_age --input utk_test/ --output ages.csv --truth labels.csv

The same ``serving.predictor.Predictor`` as the service, decoding in DataLoader workers; rows (and outputs, whole
or not at all) from ``serving.batch_output``; ``--engine ray``: ``serving/batch_ray.py``. Options, columns,
``--truth``: docs/SERVING.md, "Batch predictions".
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # --engine ray: the local Ray starts now, while torch imports (serving/ray_start.py)
    from serving.ray_start import start_early, stop_unused

    start_early(sys.argv[1:])

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from data.faces import FaceStageError
from data.imagefile import IMAGE_SUFFIXES, read_or_error
from data.preprocess import DEFAULT_MAX_PIXELS
from models.bundle import BundleError
from serving.batch_output import NO_FACE, FatalError, check_output, temp_name, to_table, write_outputs
from serving.predictor import RUNTIMES, ImageLoader, Predictor, Prepared

File = tuple[int, list[dict[str, Any]], int, str | None]  # collate's (index, faces, inputs in the batch, error)


class ImageFiles(Dataset):
    """``(index, Prepared or None, error or None)`` for each path; never raises on a bad file."""

    def __init__(
        self, paths: Sequence[Path], loader: ImageLoader, max_faces: int | None = None, detect: bool = True
    ) -> None:
        self.paths, self.loader, self.max_faces, self.detect = list(paths), loader, max_faces, detect

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Prepared | None, str | None]:
        return (i, *read_or_error(self.loader.prepare, self.paths[i], self.max_faces, self.detect))


def collate(items: list[tuple[int, Prepared | None, str | None]]) -> tuple[list[File], torch.Tensor | None]:
    """-> per file ``(index, faces, inputs it has in the batch, error)``, and every input of every good image in
    one ``(B, C, h, w)`` batch (the inputs travel only there: each tensor costs a worker a shared-memory segment)."""
    inputs = [p.inputs for _, p, _ in items if p is not None and len(p.inputs)]
    files = [(i, p.faces if p is not None else [], len(p.inputs) if p is not None else 0, e) for i, p, e in items]
    return files, torch.cat(inputs) if inputs else None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers: one thread each, the main process forwards


def resolve_model(spec: str) -> Path:
    """A bundle folder, or the folder of a BentoML model tag."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists() or "/" in spec or os.sep in spec:
        raise FatalError(f"--model {spec}: not a bundle folder")
    from models.store import bundle_dir_for_tag

    try:
        return bundle_dir_for_tag(spec)
    except BundleError as e:
        raise FatalError(f"--model {spec}: no such bundle folder, and {e}") from None


def read_csv(path: Path, option: str) -> pd.DataFrame:
    """A CSV as strings; ``FatalError`` naming ``option`` when it cannot be parsed."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FatalError(f"{option}: cannot read CSV ({str(e).splitlines()[0]})") from None


def resolve_inputs(spec: str) -> tuple[list[Path], list[str]]:
    """Paths to read and how each is shown in the output (as listed in the CSV, or as found)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".csv":
        table = read_csv(path, f"--input {spec}")
        if "path" not in table.columns:
            raise FatalError(f"--input {spec}: the CSV needs a 'path' column (has: {', '.join(table.columns)})")
        shown = table["path"].tolist()
        if not shown:
            raise FatalError(f"--input {spec}: the CSV lists no files")
        return [path.parent / p for p in shown], shown
    if path.is_file():
        return [path], [spec]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        missing = f"no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"
    else:
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        missing = "no such folder or CSV, and no files match it as a glob"
    if not found:
        raise FatalError(f"--input {spec}: {missing}")
    return found, [str(p) for p in found]


def predict(
    predictor: Predictor, paths: Sequence[Path], shown: Sequence[str], args: argparse.Namespace
) -> pd.DataFrame:
    """The local engine, with the checked options ``args``: rows in input order (``label``), predictions per
    file or per face, or an ``error``."""
    from tqdm import tqdm

    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    loader = DataLoader(
        ImageFiles(paths, predictor.loader, args.max_faces, args.detect),
        batch_size=args.batch_size,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=predictor.device.type == "cuda",
    )
    rows: list[dict[str, Any]] = []
    disable = None if args.progress is None else not args.progress  # None: on a TTY only
    with tqdm(total=len(paths), unit="file", desc="predicting", disable=disable) as bar:
        for files, batch in loader:  # in input order
            rows += label(predictor, files, batch, shown, args.top_k)
            bar.update(len(files))
    return to_table(rows, predictor, args.top_k)


def label(
    predictor: Predictor, files: list[File], batch: torch.Tensor | None, shown: Sequence[str], top_k: int
) -> list[dict[str, Any]]:
    """One ``collate``d batch -> its files' output rows in order, for every engine: one per face of a face model (or
    one with the error "no face found"), else one; one with its ``error`` for a file that could not be read."""
    out = predictor.predict_tensors(batch) if batch is not None else None  # (B, C, h, w) -> (B, ...)
    rows, at = [], 0
    for i, faces, n, err in files:
        if err is not None:
            rows.append({"path": shown[i], "error": err})
        elif not predictor.uses_faces:
            result = predictor.format(out[at], top_k)  # {"label", "score", "top_k": [...]} -> top1_label, ...
            top = {f"top{j}_{k}": e[k] for j, e in enumerate(result.pop("top_k", []), 1) for k in ("label", "score")}
            rows.append({"path": shown[i], **result, **top, "error": None})
        elif not faces:
            rows.append({"path": shown[i], "error": NO_FACE})
        else:
            for j, (face, row) in enumerate(zip(faces, out[at : at + n], strict=True)):
                (x0, y0, x1, y1), value = face["box"], predictor.format(row, top_k)[predictor.target_name]
                where = {"face": j, "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1, "face_score": face["score"]}
                rows.append({"path": shown[i], **where, predictor.target_name: value, "error": None})
        at += n
    return rows


def read_truth(spec: str, predictor: Predictor) -> dict[str, Any]:
    """The ``--truth`` CSV as {path or file name: true answer}; ``FatalError`` if unusable."""
    path = Path(spec)
    if not path.is_file():
        raise FatalError(f"--truth {spec}: no such file")
    table = read_csv(path, f"--truth {spec}")
    key = "path" if "path" in table.columns else "name" if "name" in table.columns else None
    column = "label" if predictor.task == "classification" else predictor.target_name
    if key is None or column not in table.columns:
        raise FatalError(
            f"--truth {spec}: needs a 'path' or 'name' column and a {column!r} column (has: {', '.join(table.columns)})"
        )
    truth = table[column]
    if predictor.task != "classification":
        truth = pd.to_numeric(truth, errors="coerce")
        if truth.isna().any():
            row = int(truth.isna().to_numpy().nonzero()[0][0]) + 2
            raise FatalError(f"--truth {spec}: line {row}: {column!r} is not a number")
    return dict(zip(table[key], truth, strict=True))


def score(table: pd.DataFrame, by_path: dict[str, Any], predictor: Predictor, spec: str) -> dict[str, float]:
    """Metrics of the predicted rows that have a truth (``by_path``: ``read_truth``; by path, else by file name)."""
    by_name = {Path(k).name: v for k, v in by_path.items()}
    rows = table[table["error"].isna()]
    if "face" in rows.columns:  # a face model: the largest face of each photo is scored
        rows = rows[rows["face"] == 0]
    known = [by_path.get(p, by_name.get(Path(p).name)) for p in rows["path"]]
    mask = [k is not None for k in known]
    if not any(mask):
        raise FatalError(f"--truth {spec}: none of its rows matches a predicted file (by path or file name)")
    rows = rows[mask]
    true = pd.Series([k for k in known if k is not None], index=rows.index)
    n = float(len(rows))
    if predictor.task == "classification":
        return {"n": n, "accuracy": float((rows["label"].astype(str) == true.astype(str)).mean())}
    err = rows[predictor.target_name].astype(float) - true.astype(float)
    return {
        "n": n,
        "mae": float(err.abs().mean()),
        "rmse": float((err**2).mean() ** 0.5),
        "cs5": float((err.abs() <= 5.0).mean()),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundle folder or BentoML model tag")
    p.add_argument("--input", required=True, help="folder (recursive), CSV with a 'path' column, or glob")
    p.add_argument(
        "--output",
        required=True,
        action="append",
        help="FILE.csv, FILE.parquet or DIR/ (a Parquet dataset folder, one file per block); repeat for several",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local engine: decoding processes (0: none; default min(4, CPUs)); ray engine: model actors (default 1)",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (w x h)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a TTY")
    p.add_argument(
        "--detect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="face models: find and align faces (default); --no-detect: the files already are aligned chips",
    )
    p.add_argument("--max-faces", type=int, default=None, help="face models: at most this many faces per photo")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the model: onnx (ONNX Runtime over the bundle's model.onnx, CPU), torch, or auto "
        "(default: onnx on a CPU when the bundle has model.onnx, else torch)",
    )
    p.add_argument("--truth", default=None, help="CSV of true answers (path|name + label|target): print metrics")
    ray = p.add_argument_group("Ray engine (pip install 'svertka[ray]'; see docs/BATCH.md)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process (default)")
    ray.add_argument("--address", default=None, help="Ray cluster to join (host:port, auto, ray://...); default: local")
    ray.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (0: CPU actors)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per model actor (its torch threads)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Option values that cannot work -> ``FatalError``; the checked ``(spec, path)`` outputs."""
    for name in ("batch_size", "top_k", "max_pixels") + (("max_faces",) if args.max_faces is not None else ()):
        if getattr(args, name) < 1:
            raise FatalError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < (1 if args.engine == "ray" else 0):
        least = "1 or more with --engine ray" if args.engine == "ray" else "0 or more"
        raise FatalError(f"--workers must be {least}, got {args.workers}")
    if args.engine == "local":
        for name in ("address", "num_gpus_per_worker"):
            if getattr(args, name):
                raise FatalError(f"--{name.replace('_', '-')} needs --engine ray")
    elif args.num_gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise FatalError("--num-gpus-per-worker must be 0 or more and --cpus-per-worker more than 0")
    elif str(args.device).startswith("cuda") and not args.num_gpus_per_worker:
        raise FatalError(f"--device {args.device} with --engine ray needs --num-gpus-per-worker (GPUs per actor)")
    if args.runtime == "onnx" and str(args.device).startswith("cuda"):
        raise FatalError(f"--runtime onnx runs on the CPU not with --device {args.device}")
    if args.engine == "local" and str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise FatalError(f"--device {args.device}: CUDA is not available on this machine")
    outputs = [(spec, check_output(spec)) for spec in args.output]
    paths = [out.resolve() for _, out in outputs]
    if len(set(paths)) < len(paths):
        raise FatalError(f"--output: the same path is given twice ({', '.join(args.output)})")
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        outputs = check_args(args)
        paths, shown = resolve_inputs(args.input)
        bundle = resolve_model(args.model)
        device = args.device if args.engine == "local" else "cpu"  # Ray: the driver only reads the bundle
        try:
            predictor = Predictor(bundle, device, args.max_pixels, runtime=args.runtime)
        except (BundleError, FaceStageError) as e:
            raise FatalError(f"--model {args.model}: {e}") from None
        except RuntimeError as e:  # e.g. --device cuda without a GPU
            raise FatalError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
        truth = read_truth(args.truth, predictor) if args.truth else None
        if args.engine == "ray":
            from serving.batch_ray import run_ray  # imports ray: only for this engine

            table, rows, bad, faceless = run_ray(bundle, paths, shown, outputs, args)  # written as rows arrive
        else:
            table = predict(predictor, paths, shown, args)
        metrics = score(table, truth, predictor, args.truth) if truth is not None else None
        if args.engine == "local":  # scored first: a --truth that matches no row leaves no output
            _, rows, bad, faceless = write_outputs([table], outputs)
        if metrics is not None:
            metrics_file = outputs[0][1].with_name(outputs[0][1].name + ".metrics.json")
            tmp = temp_name(metrics_file)
            tmp.write_text(json.dumps({"truth": args.truth, **metrics}, indent=2) + "\n")
            os.replace(tmp, metrics_file)
    except FatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as e:  # writing the output (disk full, permissions, ...)
        print(f"error: --output {', '.join(args.output)}: {e.strerror or e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    where = ", ".join(str(out) for _, out in outputs)
    shown_faceless = f", {faceless} without a face" if predictor.uses_faces else ""
    ran = "onnx (ONNX Runtime)" if predictor.runtime == "onnx" else "torch"
    if args.engine == "ray" and str(args.device).startswith("cuda"):
        ran = "torch (Ray GPU actors)"
    print(
        f"wrote {rows} rows to {where}: {rows - bad - faceless} predicted{shown_faceless}, {bad} unreadable; "
        f"{seconds:.1f} s ({len(paths) / seconds:.1f} files/s); runtime: {ran}",
        file=sys.stderr,
    )
    if metrics is not None:
        shown_metrics = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n")
        print(f"against {args.truth} ({int(metrics['n'])} files): {shown_metrics}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_unused()  # an early Ray that no job took (a bad option)
        gc.freeze()  # the exit's collections skip torch's objects: 0.3-0.4 s sooner (RESULTS.md, R35)
