"""HTTP serving under load: our BentoML service against a plain one-worker uvicorn app, same images, one run.

    python benchmarks/serve_load.py                                   # simple_cnn + resnet18, 1 and 32 clients, 10 s
    python benchmarks/serve_load.py --quick                           # smoke test: a few seconds per run
    python benchmarks/serve_load.py --models simple_cnn --clients 1,8,32 --seconds 20 --json out.json

For each model it measures (a) the model in this process (decode + preprocess + forward, one
image at a time and in batches of 32: the upper bound), (b) the baseline, a plain Starlette app
under ``uvicorn --workers 1`` doing the same decode and forward inline per request
(``benchmarks/_serve_baseline.py``), and (c) our service (``bentoml serve`` at the repo root,
settings from the ``SVERTKA_*`` environment as a user would set them). The load comes from
``benchmarks/_loadgen.py`` (a separate, cheap process: N closed-loop keep-alive clients for T
seconds after a warm-up). Models: ``simple_cnn`` on Fashion-MNIST 28x28 PNGs (overhead-bound)
and ``resnet18`` on UTKFace 200x200 JPEGs resized to 224 (compute-bound), both with random
weights (throughput does not depend on them). Images come from ``--data-root`` or
``$DATASETS_DIR``; without either, synthetic images (said in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _serve_common import (
    REPO,
    SERVE_MODELS,
    BenchError,
    BenchModel,
    build_bundle,
    data_root,
    fashion_png_bytes,
    free_port,
    parse_list,
    print_checks,
    server,
    tree_cpu_seconds,
    utkface_files,
    write_json,
)
from rich.console import Console
from rich.table import Table

from data.preprocess import eval_transform, load_image, preprocess
from models.bundle import load_bundle

TARGETS = {"simple_cnn": 1.0, "resnet18": 1.2}  # our requests/s over the baseline's, at 32 clients
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def write_images(m: BenchModel, root: Path | None, scratch: Path, n: int) -> tuple[list[Path], str]:
    """The request images for ``m`` as files (the load generator reads them once, up front)."""
    if m.images == "utkface":
        return utkface_files(root, n, scratch)
    datas, source = fashion_png_bytes(root, n)
    folder = scratch / "fashion_png"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, d in enumerate(datas):
        files.append(folder / f"{i:05d}.png")
        files[-1].write_bytes(d)
    return files, source


@torch.inference_mode()
def in_process(bundle: Path, files: list[Path], seconds: float, batch_size: int = 32) -> dict:
    """Images/s of decode + preprocess + forward here, one at a time and in batches (torch default threads)."""
    model, meta = load_bundle(bundle)
    spec, transform = meta.preprocess, eval_transform(meta.preprocess)
    datas = [f.read_bytes() for f in files]

    def load(i: int) -> torch.Tensor:
        return preprocess(load_image(datas[i % len(datas)], spec.channels), spec, transform)  # (C, h, w)

    def rate(step: int, fn) -> float:
        for i in range(3):  # warm-up
            fn(i * step)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(n)
            n += step
        return n / (time.perf_counter() - t0)

    single = rate(1, lambda i: model(load(i)[None]))
    batched = rate(batch_size, lambda i: model(torch.stack([load(i + j) for j in range(batch_size)])))
    return {"single_images_per_s": single, "single_ms": 1000 / single, "batched_images_per_s": batched}


def run_load(port: int, files_txt: Path, clients: int, seconds: float, warmup: float) -> dict:
    """One load-generator run against ``127.0.0.1:port`` (a separate process)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "_loadgen.py"), "--port", str(port), "--path", "/classify"]
    cmd += ["--files", str(files_txt), "--clients", str(clients), "--seconds", str(seconds), "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 180)
    if r.returncode != 0:
        raise BenchError(f"load generator failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_model(m: BenchModel, args: argparse.Namespace, scratch: Path, root: Path | None) -> dict:
    from models.store import save_bundle_to_bentoml

    files, source = write_images(m, root, scratch, args.images)
    files_txt = scratch / f"{m.key}_files.txt"
    files_txt.write_text("\n".join(map(str, files)) + "\n")
    bundle = build_bundle(m, scratch / "bundles")
    tag = save_bundle_to_bentoml(bundle, f"bench_{m.key}")
    console.print(f"[bold]{m.key}[/]: {len(files)} images from {source}; random weights; BentoML model {tag}")

    result: dict = {"images": source, "n_images": len(files), "tag": tag}
    console.print("  (a) in process ...")
    result["in_process"] = in_process(bundle, files, args.inproc_seconds)

    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
    servers = {
        "baseline": (
            [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO / "benchmarks"), "_serve_baseline:app"]
            + ["--host", "127.0.0.1", "--workers", "1", "--log-level", "warning", "--no-access-log", "--port"],
            {**env, "SVERTKA_BENCH_BUNDLE": str(bundle)},
            "/healthz",
        ),
        "service": (
            [str(Path(sys.executable).parent / "bentoml"), "serve", "--host", "127.0.0.1", "--port"],
            {**env, "SVERTKA_MODELS": tag},
            "/readyz",
        ),
    }
    for name, (cmd, server_env, ready) in servers.items():
        port = free_port()
        label = "(b) baseline (uvicorn, 1 worker)" if name == "baseline" else "(c) our service (bentoml serve)"
        console.print(f"  {label} on port {port} ...")
        log = scratch / f"{m.key}_{name}.log"
        with server([*cmd, str(port)], server_env, port, ready, log) as proc:
            result[name] = {}
            for clients in args.clients:
                cpu0, t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
                r = run_load(port, files_txt, clients, args.seconds, args.warmup)
                cpu = tree_cpu_seconds(proc.pid) - cpu0
                r["server_cpu_cores"] = cpu / (time.perf_counter() - t0)
                r["server_cpu_ms_per_request"] = 1000 * cpu / max(r["requests_with_warmup"], 1)
                result[name][clients] = r
                console.print(
                    f"    {clients:>3} clients: {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                    f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  server CPU "
                    f"{r['server_cpu_ms_per_request']:.1f} ms/request ({r['server_cpu_cores']:.2f} cores), "
                    f"load generator {r['loadgen_cpu_fraction']:.2f} cores"
                )
                for sample in r["error_samples"][:2]:
                    console.print(f"      [red]error[/]: {sample}", markup=False)
    return result


def report(results: dict, clients: list[int]) -> list[tuple[str, bool]]:
    """Print the table and the ratios; return ``(target, met)`` pairs."""
    table = Table(
        title="Serving under load (requests/s; latency in ms; server CPU ms per request)",
        caption="(a): images/s of decode + preprocess + forward in this process, the upper bound; "
        "CPU/req: CPU time of the server's process tree per request; of (a): req/s over the better (a); "
        "random weights",
    )
    cols = ("model", "run", "clients", "req/s", "p50", "p95", "p99", "errors", "CPU/req", "of (a)", "ours/base")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "run") else "right")
    for key, r in results.items():
        ip = r["in_process"]
        bound = max(ip["single_images_per_s"], ip["batched_images_per_s"])
        table.add_row(key, "(a) in process, 1 by 1", "-", f"{ip['single_images_per_s']:.1f}", f"{ip['single_ms']:.1f}")
        table.add_row(key, "(a) in process, batch 32", "-", f"{ip['batched_images_per_s']:.1f}")
        for c in clients:
            b, s = r["baseline"][c], r["service"][c]
            ratio = s["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
            for name, x in (("(b) baseline", b), ("(c) our service", s)):
                cells = [f"{x[k]:.1f}" for k in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms")]
                cpu, of_a = x["server_cpu_ms_per_request"], x["requests_per_s"] / bound
                cells += [str(x["errors"]), f"{cpu:.1f}", f"{of_a:.2f}"]
                table.add_row(key, name, str(c), *cells, f"{ratio:.2f}x" if name[1] == "c" else "")
        table.add_section()
    console.print(table)

    checks: list[tuple[str, bool]] = []
    top = 32 if 32 in clients else max(clients)
    for key, r in results.items():
        if key == "simple_cnn" and 1 in clients:
            p50 = r["service"][1]["p50_ms"]
            checks.append((f"simple_cnn, 1 client: median {p50:.1f} ms <= 15 ms", p50 <= 15))
        s, b = r["service"][top], r["baseline"][top]
        checks.append((f"{key}, {top} clients: {s['errors']} errors (want 0)", s["errors"] == 0))
        ratio_p = s["p99_ms"] / s["p50_ms"] if s["p50_ms"] else float("inf")
        checks.append((f"{key}, {top} clients: p99 / p50 = {ratio_p:.2f} (want <= 3)", ratio_p <= 3))
        ratio = s["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
        want = TARGETS.get(key, 1.0)
        checks.append((f"{key}, {top} clients: ours / baseline req/s = {ratio:.2f}x (want >= {want}x)", ratio >= want))
    print_checks(console, checks)
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn,resnet18", help=f"comma-separated: {', '.join(SERVE_MODELS)}")
    p.add_argument("--clients", default="1,32", help="comma-separated concurrent client counts")
    p.add_argument("--seconds", type=float, default=None, help="recorded load per run (default 10; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded load first (default 2; --quick 0.5)")
    p.add_argument("--images", type=int, default=None, help="distinct request images (default 500; --quick 64)")
    p.add_argument("--data-root", default=None, help="data sets folder (default: $DATASETS_DIR)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short runs, few images")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.images = args.images or (64 if args.quick else 500)
    args.inproc_seconds = 1.0 if args.quick else 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        keys = parse_list(args.models, list(SERVE_MODELS), "--models")
        try:
            args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
        except ValueError:
            raise BenchError(f"--clients {args.clients!r}: expected comma-separated integers") from None
        if not args.clients or min(args.clients) < 1 or args.seconds <= 0 or args.images < 1:
            raise BenchError("--clients, --seconds and --images must be positive")
        root = data_root(args.data_root)
        with tempfile.TemporaryDirectory(prefix="svertka-serve-load-") as tmp:
            scratch = Path(tmp)
            os.environ["BENTOML_HOME"] = str(scratch / "bentoml")  # a private model store, before bentoml loads
            settings = {k: v for k, v in os.environ.items() if k.startswith("SVERTKA_") and k != "SVERTKA_MODELS"}
            console.print(
                f"CPUs: {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads here); "
                f"load: {args.clients} clients x {args.seconds:g} s after {args.warmup:g} s warm-up; "
                f"service settings: {settings or 'defaults'}"
            )
            results = {key: bench_model(SERVE_MODELS[key], args, scratch, root) for key in keys}
    except BenchError as e:
        console.print(f"error: {e}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    write_json(args.json, args, results, report(results, args.clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
