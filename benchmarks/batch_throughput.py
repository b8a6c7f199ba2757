"""Batch labelling throughput: ``python -m serving.batch`` against in-process decode + forward, same files, one run.

    python benchmarks/batch_throughput.py                          # 5,000 UTKFace JPEGs, simple_cnn age model
    python benchmarks/batch_throughput.py --models simple_cnn,resnet18 --images 10000 --json out.json
    python benchmarks/batch_throughput.py --quick                  # smoke test: 300 images
    python benchmarks/batch_throughput.py --images 19362 --ray --no-bound --repeats 3   # Ray engine vs local

``--ray`` adds the Ray engine (``--engine ray``, a local Ray started by the script, one model
actor per core) beside the local engine: both run as a user runs them, whole runs timed (Ray's start-up
included), alternating ``--repeats`` times; medians, their spread and the ratio are printed.
Target: the Ray engine at least 0.8 of the local engine's images/s. ``--no-bound`` skips the
in-process bound below. Both engines run the script's default runtime (ONNX Runtime on a CPU).

``--runtime-ab`` times ``--runtime onnx`` (ONNX Runtime over the bundle's model.onnx, the script's
default on a CPU and its one optimized path) against ``--runtime torch`` (the PyTorch module as it
is, eager: what runs on a GPU and for a bundle without model.onnx), whole runs alternating;
targets: 1.25x on resnet18, 1.0x on the others. (ONNX Runtime against the TorchScript forward that
``--runtime torch`` ran before it was removed: docs/RESULTS.md.)

    python benchmarks/batch_throughput.py --models simple_cnn,resnet18 --runtime-ab --no-bound --repeats 3

The batch script runs as a user runs it (a subprocess over a CSV listing the files, CSV out),
timed from start to exit; its own ``files/s`` line (which leaves out interpreter start-up) is
shown too. The upper bound runs here on the same files with the same model, batch size and
threads: ``data.preprocess.load_image`` + the bundle's preprocessing + batched forward in ONNX
Runtime (``serving.predictor.Predictor(runtime="onnx")``, what the script and the service run),
once decoding one file after another and once decoding in as many threads as the script has
decoding workers; the better of the two is the bound. Models
(random weights, which do not change the speed): ``simple_cnn`` built for 64x64 RGB and
``resnet18`` at 224x224, both age regressors, the models a user would run over UTKFace-like
folders. Files are read in place from ``$DATASETS_DIR/UTKFace`` (or ``--data-root``); without
it, synthetic JPEGs (said in the output). Target: the script reaches at least 0.8 of the bound.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from _serve_common import (
    BATCH_MODELS,
    REPO,
    BenchError,
    build_bundle,
    data_root,
    parse_list,
    print_checks,
    utkface_files,
    write_json,
)
from rich.console import Console
from rich.table import Table

from data.preprocess import load_image
from serving.predictor import Predictor

TARGET = 0.8
MIN_IMAGES = 5000
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def upper_bound(bundle: Path, files: list[Path], batch_size: int, threads: int) -> float:
    """Images/s of decode + preprocess + batched ONNX Runtime forward here; ``threads`` decoding threads (0: inline)."""
    predictor = Predictor(bundle, device="cpu", runtime="onnx")  # the forward the script and the service run
    spec, forward = predictor.spec, predictor.predict_tensors

    def load(path: Path) -> torch.Tensor:
        return predictor.loader.preprocess(load_image(path, spec.channels))  # (C, h, w)

    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    forward(torch.stack([load(p) for p in chunks[0]]))  # warm-up at the batch size
    t0 = time.perf_counter()
    if threads == 0:
        for chunk in chunks:
            forward(torch.stack([load(p) for p in chunk]))  # (B, C, h, w) -> (B,)
    else:
        with ThreadPoolExecutor(threads) as pool:
            todo, pending = iter(chunks), deque()
            for chunk in (next(todo, None) for _ in range(2)):  # two batches in flight, as a prefetch
                if chunk:
                    pending.append([pool.submit(load, p) for p in chunk])
            while pending:
                batch = torch.stack([f.result() for f in pending.popleft()])
                if (chunk := next(todo, None)) is not None:
                    pending.append([pool.submit(load, p) for p in chunk])
                forward(batch)
    return len(files) / (time.perf_counter() - t0)


def run_batch_script(
    bundle: Path,
    csv: Path,
    out: Path,
    batch_size: int,
    workers: int | None,
    engine: str = "local",
    runtime: str = "auto",
) -> dict:
    """Run ``python -m serving.batch`` as a user would; wall-clock images/s and its own reported rate."""
    cmd = [sys.executable, "-m", "serving.batch", "--model", str(bundle), "--input", str(csv), "--output", str(out)]
    cmd += ["--batch-size", str(batch_size), "--no-progress", "--engine", engine]
    cmd += ["--runtime", runtime]
    if workers is not None and engine == "local":
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:3])} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    own = re.search(r"\(([\d.]+) files/s\)", r.stderr)
    return {"seconds": seconds, "own_images_per_s": float(own.group(1)) if own else None, "stderr": r.stderr[-500:]}


def check_rows(out: Path, n: int, who: str) -> None:
    table = pd.read_csv(out)
    bad = int(table["error"].notna().sum()) if "error" in table else 0
    if len(table) != n or bad:
        raise BenchError(f"{who} wrote {len(table)} rows for {n} files, {bad} with errors")
    out.unlink()


def bench_model(key: str, args: argparse.Namespace, files: list[Path], csv: Path, scratch: Path) -> dict:
    m = BATCH_MODELS[key]
    bundle = build_bundle(m, scratch / "bundles")
    h, w = m.spec.input_size
    console.print(f"[bold]{key}[/] ({m.arch}, {m.spec.channels}x{h}x{w}, {m.task}, random weights)")
    result: dict = {"model": f"{m.arch} {m.spec.channels}x{h}x{w} {m.task}"}
    if not args.no_bound:
        result |= bench_bound(bundle, args, files, csv, scratch)
    if args.ray:
        result["engines"] = bench_pair("engines", bundle, args, files, csv, scratch)
    if args.runtime_ab:
        result["runtimes"] = bench_pair("runtimes", bundle, args, files, csv, scratch)
    return result


def bench_bound(bundle: Path, args: argparse.Namespace, files: list[Path], csv: Path, scratch: Path) -> dict:
    """The local engine against the in-process decode + forward bound."""
    threads = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)  # the script's default
    serial = upper_bound(bundle, files, args.batch_size, 0)
    console.print(f"  in process, decoding inline:        {serial:8.1f} images/s")
    threaded = upper_bound(bundle, files, args.batch_size, threads) if threads else serial
    console.print(f"  in process, {threads} decoding threads:     {threaded:8.1f} images/s")
    out = scratch / "labels.csv"
    run = run_batch_script(bundle, csv, out, args.batch_size, args.workers, runtime="onnx")
    check_rows(out, len(files), "the batch script")
    script = len(files) / run["seconds"]
    console.print(f"  python -m serving.batch (whole run): {script:8.1f} images/s  ({run['seconds']:.1f} s)")
    bound = max(serial, threaded)
    return {
        "inprocess_inline_images_per_s": serial,
        "inprocess_threads": threads,
        "inprocess_threaded_images_per_s": threaded,
        "upper_bound_images_per_s": bound,
        "script_images_per_s": script,
        "script_seconds": run["seconds"],
        "script_own_images_per_s": run["own_images_per_s"],
        "ratio": script / bound,
        "ratio_own": run["own_images_per_s"] / bound if run["own_images_per_s"] else None,
    }


def alternate(
    bundle: Path, contenders: dict[str, dict], args: argparse.Namespace, files: list[Path], csv: Path, scratch: Path
) -> dict[str, list[float]]:
    """Whole runs of the batch script, one per contender (``run_batch_script`` keywords), alternating
    ``args.repeats`` times (the order flips every repeat) -> images/s per contender, in run order."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(args.repeats):
        for name in list(contenders) if i % 2 == 0 else list(reversed(contenders)):
            out = scratch / "labels_ab.csv"
            run = run_batch_script(bundle, csv, out, args.batch_size, args.workers, **contenders[name])
            check_rows(out, len(files), name)
            rates[name].append(len(files) / run["seconds"])
            own = f", its own line {run['own_images_per_s']:.1f}" if run["own_images_per_s"] else ""
            console.print(
                f"  repeat {i + 1}, {name:16}: {rates[name][-1]:8.1f} images/s  ({run['seconds']:.1f} s whole run{own})"
            )
    return rates


# Whole-run comparisons of the script: results entry -> its two contenders, baseline first, each
# (short name in the results and tables, the option shown, ``run_batch_script`` keywords).
PAIRS = {
    "engines": (("local", "--engine local", {"engine": "local"}), ("ray", "--engine ray", {"engine": "ray"})),
    "runtimes": (
        ("torch", "--runtime torch", {"runtime": "torch"}),
        ("onnx", "--runtime onnx", {"runtime": "onnx"}),
    ),
}
RUNTIME_TARGETS = {"resnet18": 1.25}  # --runtime onnx against --runtime torch; others: 1.0


def bench_pair(part: str, bundle: Path, args: argparse.Namespace, files: list[Path], csv: Path, scratch: Path) -> dict:
    """``PAIRS[part]``'s two contenders, whole runs alternating ``args.repeats`` times: images/s, medians, ratio."""
    rates = alternate(bundle, {shown: kwargs for _, shown, kwargs in PAIRS[part]}, args, files, csv, scratch)
    out: dict = {"repeats": args.repeats}
    for name, shown, _ in PAIRS[part]:
        out |= {f"{name}_images_per_s": rates[shown], f"{name}_median": statistics.median(rates[shown])}
    (a, *_), (b, *_) = PAIRS[part]
    return out | {"ratio": out[f"{b}_median"] / out[f"{a}_median"]}


def spread_table(
    title: str, cols: tuple[str, str], rows: dict[str, tuple[str, list[float], list[float], float]]
) -> None:
    """One row per model: two contenders' median (min-max) images/s and the ratio of the medians."""
    table = Table(title=title)
    for col in ("model", f"{cols[0]}: median (min-max)", f"{cols[1]}: median (min-max)", f"{cols[1]} / {cols[0]}"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, (model, a, b, ratio) in rows.items():
        shown = [f"{statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})" for r in (a, b)]
        table.add_row(f"{key}: {model}", *shown, f"{ratio:.2f}")
    console.print(table)


def report(results: dict, n: int, batch_size: int) -> list[tuple[str, bool]]:
    checks = report_bound(results, n, batch_size) if any("ratio" in r for r in results.values()) else []
    comparisons = (  # (results entry, title, wanted ratio, the check's words)
        ("engines", "--engine ray against --engine local", TARGET,
         "Ray engine at {:.2f} of the local engine, start-up included"),
        ("runtimes", "--runtime onnx (ONNX Runtime) against --runtime torch (eager), local engine", None,
         "--runtime onnx at {:.2f}x --runtime torch"),
    )  # fmt: skip
    for part, title, want, words in comparisons:
        (a, *_), (b, *_) = PAIRS[part]
        found = {k: r[part] for k, r in results.items() if part in r}
        if found:
            rows = {
                k: (results[k]["model"], c[f"{a}_images_per_s"], c[f"{b}_images_per_s"], c["ratio"])
                for k, c in found.items()
            }
            spread_table(f"{title}, {n} files, whole runs (images/s)", (a, b), rows)
            wants = {k: want if want is not None else RUNTIME_TARGETS.get(k, 1.0) for k in found}
            checks += [
                (f"{k}: {words.format(c['ratio'])} (want >= {wants[k]})", c["ratio"] >= wants[k])
                for k, c in found.items()
            ]
    if n < MIN_IMAGES:
        checks.append((f"{n} files (the target is measured over at least {MIN_IMAGES})", False))
    print_checks(console, checks)
    return checks


def report_bound(results: dict, n: int, batch_size: int) -> list[tuple[str, bool]]:
    table = Table(title=f"Batch labelling, {n} files, batch size {batch_size} (images/s)")
    cols = ("model", "in process, inline", "in process, threads", "batch script", "script's own", "script / bound")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, r in results.items():
        own = r["script_own_images_per_s"]
        table.add_row(
            f"{key}: {r['model']}",
            f"{r['inprocess_inline_images_per_s']:.1f}",
            f"{r['inprocess_threaded_images_per_s']:.1f} ({r['inprocess_threads']})",
            f"{r['script_images_per_s']:.1f}",
            f"{own:.1f}" if own else "-",
            f"{r['ratio']:.2f}",
        )
    console.print(table)
    checks = []
    for key, r in results.items():
        text = f"{key}: batch script, whole run, at {r['ratio']:.2f} of the in-process bound (want >= {TARGET})"
        checks.append((text, r["ratio"] >= TARGET))
        if r["ratio_own"] is not None:
            text = f"{key}: batch script's own rate (no start-up) at {r['ratio_own']:.2f} of the bound"
            checks.append((text, r["ratio_own"] >= TARGET))
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn", help=f"comma-separated: {', '.join(BATCH_MODELS)}")
    p.add_argument("--images", type=int, default=None, help=f"files to label (default {MIN_IMAGES}; --quick 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="the script's --workers (default: its own default)")
    p.add_argument("--data-root", default=None, help="data sets folder (default: $DATASETS_DIR)")
    p.add_argument("--quick", action="store_true", help="a smoke run over 300 files")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--ray", action="store_true", help="also compare --engine ray with --engine local")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each contender (--ray, --runtime-ab)")
    p.add_argument("--no-bound", action="store_true", help="skip the local engine's in-process bound")
    p.add_argument("--runtime-ab", action="store_true", help="also compare --runtime onnx with --runtime torch (eager)")
    args = p.parse_args(argv)
    args.images = args.images or (300 if args.quick else MIN_IMAGES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        keys = parse_list(args.models, list(BATCH_MODELS), "--models")
        if args.images < 1 or args.batch_size < 1 or (args.workers is not None and args.workers < 0):
            raise BenchError("--images and --batch-size must be positive, --workers 0 or more")
        if args.repeats < 1 or (args.no_bound and not (args.ray or args.runtime_ab)):
            raise BenchError("--repeats must be positive; --no-bound needs --ray or --runtime-ab (nothing to measure)")
        root = data_root(args.data_root)
        with tempfile.TemporaryDirectory(prefix="svertka-batch-bench-") as tmp:
            scratch = Path(tmp)
            files, source = utkface_files(root, args.images, scratch)
            csv = scratch / "inputs.csv"
            pd.DataFrame({"path": [str(f) for f in files]}).to_csv(csv, index=False)
            for f in files:  # warm the page cache: both contenders read from memory
                f.read_bytes()
            console.print(
                f"{len(files)} files from {source}; CPUs: {os.cpu_count()}, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)"
            )
            results = {key: bench_model(key, args, files, csv, scratch) for key in keys}
    except BenchError as e:
        console.print(f"error: {e}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    write_json(args.json, args, results, report(results, args.images, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
