"""HTTP serving under load as users measure it: our service beside fair peers, with wrk and one Python session.

The must-show numbers of issue #23 (a quiet 2-core machine; `apt-get install wrk` first, `make wrk`):

    python benchmarks/serve_load.py --models simple_cnn     # 5 alternating repeats, wrk 32 connections x 10 s,
    python benchmarks/serve_load.py --models resnet18       # then 32 tasks on one aiohttp session x 5 s
    python benchmarks/serve_load.py --soak 5                # 64 connections x 5 min on simple_cnn: status
                                                            # codes, worker RSS over time, Retry-After on 503s
    python benchmarks/serve_load.py --quick                 # smoke run: 1 repeat, 2 s runs
    python benchmarks/serve_load.py --servers service --variant b32:SVERTKA_MAX_BATCH_SIZE=8   # ours, a setting changed
    python benchmarks/serve_load.py --servers service --variant old@../main   # ours, from another checkout

Servers (``--servers``), all up at once; each repeat runs every server in turn, the order reversed
every other repeat, so a noisy machine's drift hits them alike:
- ``plain2``: the plain Starlette app a user writes by hand (``benchmarks/_serve_plain.py``: eager
  PyTorch, one image per forward, inline in the handler) under ``uvicorn --workers W``, W = our
  workers (one per core), with ``CPU count / W`` torch threads per worker, as ours;
- ``plain1``: the same app on one uvicorn worker at torch's default threads (the old baseline);
- ``litserve``: LitServe with its batching (``benchmarks/_serve_litserve.py``: W inference workers,
  batches of up to 8 within 5 ms, eager);
- ``service``: ours (``bentoml serve`` at the repo root, ``SVERTKA_*`` from the environment);
- ``bento_batching``: BentoML's own adaptive batching on a one-argument copy of ``/classify``;
- ``--variant NAME[@DIR][:SVERTKA_X=...]``: ours again with other settings or another checkout's ``serving/``
  (the on/off table of docs/SERVING.md).

Load: ``wrk`` (C; ``benchmarks/wrk_multipart.lua`` posts the images as multipart uploads) with
``--connections`` keep-alive connections for ``--seconds``, on fresh connections every run (the
first second counts: a server that serves new connections unevenly shows it in its p99), then
``--python-clients`` tasks on one shared ``aiohttp.ClientSession`` (``benchmarks/_loadgen.py``, the
Python user's view; ``0`` skips it). Before the repeats each server gets an unrecorded warm-up.
Only the server being measured runs: the others are stopped (SIGSTOP) meanwhile, since some use CPU
while idle (LitServe's inference workers poll their queues: ~0.4 cores); before it is paused, a server
gets as long as its slowest answer took, to finish what the load left in flight. The in-process bound runs
the forward the service runs (``serving.predictor.Predictor`` as the service builds it): decode +
preprocess + forward one image at a time and in batches of 32.
Models: ``simple_cnn`` on Fashion-MNIST 28x28 PNGs (overhead-bound) and ``resnet18`` on UTKFace
200x200 JPEGs resized to 224 (compute-bound), both with random weights. Images come from
``--data-root`` or ``$DATASETS_DIR``; without either, synthetic images (said in the output).
Printed: per server and tool the median req/s with its min-max over the repeats, median p50/p99,
errors; our p99/p50 in every run; ours over each peer (ratio of the medians, and the range of the
per-repeat ratios); the issue's targets as PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
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
    parse_variant,
    print_checks,
    server,
    service_workers,
    tree_cpu_seconds,
    utkface_files,
    write_json,
)
from rich.console import Console

LABELS = {
    "plain2": "plain app, {w} uvicorn workers",
    "plain1": "plain app, 1 uvicorn worker",
    "litserve": "LitServe, batching",
    "service": "our service",
    "bento_batching": "BentoML adaptive batching",
}
# Issue #23, wrk at 32 connections: ours over (plain2, litserve), at least.
TARGETS = {"simple_cnn": {"plain2": 1.5, "litserve": 2.0}, "resnet18": {"plain2": 2.5, "litserve": 1.5}}
TOOLS = ("wrk", "python")
PAUSED: set[subprocess.Popen] = set()  # servers stopped while another one is measured
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def write_images(m: BenchModel, root: Path | None, scratch: Path, n: int) -> tuple[list[Path], str]:
    """The request images for ``m`` as files (wrk and the Python session read them once, up front)."""
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
    """Images/s of decode + preprocess + the service's forward here, one at a time and in batches."""
    from serving.predictor import Predictor
    from serving.settings import Settings

    s = Settings.from_env({k: v for k, v in os.environ.items() if k != "SVERTKA_MODELS"})
    pred = Predictor(bundle, "cpu", s.max_pixels, runtime=s.runtime)
    datas = [f.read_bytes() for f in files]

    def rate(step: int, fn) -> float:
        for i in range(3):  # warm-up
            fn(i * step)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(n)
            n += step
        return n / (time.perf_counter() - t0)

    def load(i: int) -> torch.Tensor:
        return pred.prepare(datas[i % len(datas)], detect=False).inputs[0]  # (C, h, w), as the service prepares it

    single = rate(1, lambda i: pred.predict_tensors(load(i)[None]))
    batched = rate(batch_size, lambda i: pred.predict_tensors(torch.stack([load(i + j) for j in range(batch_size)])))
    return {"single_images_per_s": single, "batched_images_per_s": batched, "forward": pred.runtime}


def run_wrk(port: int, files_txt: Path, connections: int, seconds: float, threads: int = 1) -> dict:
    """One wrk run on fresh connections -> requests/s, latency percentiles (ms), status counts, errors."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s"]
    cmd += ["-s", str(REPO / "benchmarks" / "wrk_multipart.lua"), f"http://127.0.0.1:{port}/classify", "--"]
    r = subprocess.run([*cmd, str(files_txt)], capture_output=True, text=True, timeout=seconds + 120)
    line = next((s for s in r.stdout.splitlines() if s.startswith("JSON ")), None)
    if r.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-600:]}")
    return wrk_summary(json.loads(line[5:]))


def wrk_summary(w: dict) -> dict:
    """wrk's done() JSON (microseconds) -> the benchmark's numbers (ms); every non-2xx answer and socket
    error is an error."""
    seconds = w["duration_us"] / 1e6
    broken = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    errors = w["status_errors"] + broken
    return {
        "requests": w["requests"],
        "errors": errors,
        "requests_per_s": (w["requests"] - w["status_errors"]) / seconds if seconds else 0.0,
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "status_counts": {str(k): v for k, v in sorted(w["status_counts"].items())},
        "no_retry_after_503s": w["no_retry_after_503s"],
        "broken": broken,
    }


def run_python(port: int, files_txt: Path, clients: int, seconds: float, warmup: float = 1.0) -> dict:
    """One run of ``_loadgen.py`` (a separate process: N tasks on one aiohttp session)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "_loadgen.py"), "--port", str(port), "--files", str(files_txt)]
    cmd += ["--clients", str(clients), "--seconds", str(seconds), "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 180)
    if r.returncode != 0:
        raise BenchError(f"load generator failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def server_specs(bundle: Path, tag: str, workers: int) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """Each server: its command (the port goes last), environment and readiness path."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1", "SVERTKA_BENCH_BUNDLE": str(bundle)}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    bentoml = str(Path(sys.executable).parent / "bentoml")
    uvicorn = [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO / "benchmarks"), "_serve_plain:app"]
    uvicorn += ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]
    return {
        "plain2": (
            [*uvicorn, "--workers", str(workers), "--port"],
            {**env, "SVERTKA_BENCH_THREADS": threads},
            "/healthz",
        ),
        "plain1": ([*uvicorn, "--workers", "1", "--port"], env, "/healthz"),
        "litserve": (
            [sys.executable, str(REPO / "benchmarks" / "_serve_litserve.py"), "--workers", str(workers), "--port"],
            {**env, "PYTHONPATH": str(REPO)},
            "/health",
        ),
        "service": ([bentoml, "serve", "--host", "127.0.0.1", "--port"], {**env, "SVERTKA_MODELS": tag}, "/readyz"),
        "bento_batching": (
            [bentoml, "serve", "benchmarks._serve_bentoml_batching:BentoBatching", "--host", "127.0.0.1", "--port"],
            env,
            "/readyz",
        ),
    }


def pause(others: dict[str, subprocess.Popen]) -> None:
    """Stop (SIGSTOP) the process groups of ``others`` and continue every other server's: a server that is not
    being measured uses no CPU (LitServe's inference workers poll their queues, ~0.4 cores while idle)."""
    for proc in PAUSED - set(others.values()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
        PAUSED.discard(proc)
    for proc in set(others.values()) - PAUSED:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
        PAUSED.add(proc)
    time.sleep(0.2 if others else 0.0)  # continued servers catch up on their timers


def settle(r: dict) -> dict:
    """Wait as long as the run's slowest answer took: requests the load tool left in flight when it stopped
    are answered before the server is paused (and do not slow its next run). Returns ``r``."""
    time.sleep(min(r["max_ms"] / 1000, 10.0) if r["max_ms"] == r["max_ms"] else 1.0)  # (nan: no answer)
    return r


def summarize(runs: list[dict]) -> dict:
    """One server's runs with one tool -> medians, min-max of req/s, errors summed, p99/p50 of each run."""
    rates = [r["requests_per_s"] for r in runs]
    return {
        "requests_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "tail_ratios": [r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("inf") for r in runs],
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


def ratio(ours: dict, peer: dict) -> tuple[float, float, float]:
    """Ours over a peer: the ratio of the medians, and the lowest and highest per-repeat ratio."""
    per = [a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
           for a, b in zip(ours["runs"], peer["runs"], strict=True)]  # fmt: skip
    med = ours["requests_per_s"] / peer["requests_per_s"] if peer["requests_per_s"] else float("inf")
    return med, min(per), max(per)


def bench_model(m: BenchModel, args: argparse.Namespace, scratch: Path, root: Path | None) -> dict:
    from models.store import save_bundle_to_bentoml

    files, source = write_images(m, root, scratch, args.images)
    files_txt = scratch / f"{m.key}_files.txt"
    files_txt.write_text("\n".join(map(str, files)) + "\n")
    bundle = build_bundle(m, scratch / "bundles")
    tag = save_bundle_to_bentoml(bundle, f"bench_{m.key}")
    workers = service_workers()
    console.print(f"[bold]{m.key}[/]: {len(files)} images from {source}; random weights; BentoML model {tag}")
    result: dict = {"images": source, "n_images": len(files), "tag": tag, "workers": workers}
    result["in_process"] = ip = in_process(bundle, files, args.inproc_seconds)
    console.print(
        f"  in process ({ip['forward']} forward, {torch.get_num_threads()} threads): {ip['single_images_per_s']:.1f} "
        f"images/s one by one, {ip['batched_images_per_s']:.1f} in batches of 32"
    )
    specs = server_specs(bundle, tag, workers)
    servers = {name: (*specs[name], REPO) for name in args.servers}
    for name, folder, overrides in args.variant:  # ours again: other settings, or the serving/ of another checkout
        cmd, env, ready = specs["service"]
        servers[name] = (
            cmd,
            {**env, **({"PYTHONPATH": str(folder)} if folder else {}), **overrides},
            ready,
            folder or REPO,
        )
    variant_env = dict(args.variant_env)
    labels = {n: n in LABELS and LABELS[n].format(w=workers) or f"ours, {variant_env[n]}" for n in servers}
    runs: dict[str, dict[str, list[dict]]] = {name: {tool: [] for tool in args.tools} for name in servers}
    with contextlib.ExitStack() as stack:  # all servers up at once: their runs alternate
        procs: dict[str, tuple[int, subprocess.Popen]] = {}
        for name, (cmd, env, ready, cwd) in servers.items():
            port = free_port()
            log = scratch / f"{m.key}_{name}.log"
            proc = stack.enter_context(server([*cmd, str(port)], env, port, ready, log, timeout=300, cwd=cwd))
            procs[name] = (port, proc)
        stack.callback(pause, {})  # first out: every server continued before it is stopped
        for name, (port, proc) in procs.items():  # first requests are slow (allocations, lazy set-up): not measured
            pause({n: p for n, (_, p) in procs.items() if n != name})
            settle(run_wrk(port, files_txt, 8, args.warmup))
            cpu0 = tree_cpu_seconds(proc.pid)
            time.sleep(1.0)
            idle = 1000 * (tree_cpu_seconds(proc.pid) - cpu0)
            console.print(f"  {labels[name]:<32} port {port}, idle {idle:.0f} ms CPU per second")
        for rep in range(args.repeats):
            order = list(procs) if rep % 2 == 0 else list(procs)[::-1]
            for name in order:
                port, _ = procs[name]
                pause({n: p for n, (_, p) in procs.items() if n != name})
                for tool in args.tools:
                    if tool == "wrk":
                        r = run_wrk(port, files_txt, args.connections, args.seconds, args.wrk_threads)
                    else:
                        r = run_python(port, files_txt, args.python_clients, args.python_seconds)
                    runs[name][tool].append(settle(r))
                    tail = r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("inf")
                    console.print(
                        f"  repeat {rep + 1} {labels[name]:<32} {tool:>6}: {r['requests_per_s']:8.1f} req/s  p50 "
                        f"{r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms (x{tail:.1f})  errors {r['errors']}"
                        + (f" {r.get('status_counts')}" if r["errors"] else "")
                    )
    result["labels"] = labels
    result["servers"] = {name: {tool: summarize(rs) for tool, rs in by.items()} for name, by in runs.items()}
    return result


def report(results: dict, args: argparse.Namespace) -> list[tuple[str, bool]]:
    """Print medians, spreads and ratios; return the issue's targets as ``(target, met)`` pairs."""
    checks: list[tuple[str, bool]] = []
    for key, r in results.items():
        ip = r["in_process"]
        console.print(
            f"\n[bold]{key}[/]: medians of {args.repeats} alternating repeats (req/s, min-max); in process "
            f"{ip['single_images_per_s']:.0f} one by one, {ip['batched_images_per_s']:.0f} batched ({ip['forward']})"
        )
        servers, labels = r["servers"], r["labels"]
        for tool in args.tools:
            load = f"wrk {args.connections} connections" if tool == "wrk" else f"{args.python_clients} aiohttp tasks"
            console.print(f"  {load}:")
            for name, by in servers.items():
                s = by[tool]
                line = f"    {labels[name]:<32} {s['requests_per_s']:8.1f} ({s['min']:.1f}-{s['max']:.1f})  p50 "
                line += f"{s['p50_ms']:7.1f}  p99 {s['p99_ms']:7.1f} ms  errors {s['errors']}"
                if name == "service" or name in dict(args.variant_env):
                    line += "  p99/p50 per run " + "/".join(f"{t:.1f}" for t in s["tail_ratios"])
                console.print(line)
            if "service" not in servers:
                continue
            ours = servers["service"][tool]
            for name in [n for n in servers if n != "service"]:
                med, lo, hi = ratio(ours, servers[name][tool])
                console.print(f"    ours / {labels[name]:<25} {med:5.2f}x (per repeat {lo:.2f}-{hi:.2f})")
                want = TARGETS.get(key, {}).get(name)
                if tool == "wrk" and want:
                    checks.append((f"{key}, wrk: ours / {labels[name]} = {med:.2f}x (want >= {want}x)", med >= want))
                if tool == "python" and name in ("plain2", "litserve"):
                    text = f"{key}, one Python session: ours / {labels[name]} = {med:.2f}x (want > 1)"
                    checks.append((text, med > 1))
            worst = max(ours["tail_ratios"])
            checks.append((f"{key}, {tool}: our p99/p50 at most {worst:.2f} over the runs (want <= 3)", worst <= 3))
            checks.append((f"{key}, {tool}: our errors {ours['errors']} (want 0)", ours["errors"] == 0))
    print_checks(console, checks)
    return checks


def tree_rss_mb(pid: int) -> dict[int, float]:
    """RSS (MB) of each process under ``pid`` whose command line runs a BentoML service worker."""
    import psutil

    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                out[child.pid] = child.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def soak(args: argparse.Namespace, scratch: Path, root: Path | None) -> list[tuple[str, bool]]:
    """``--soak-clients`` wrk connections for ``--soak`` minutes against simple_cnn: codes, RSS, Retry-After."""
    from models.store import save_bundle_to_bentoml

    m = SERVE_MODELS["simple_cnn"]
    files, source = write_images(m, root, scratch, args.images)
    files_txt = scratch / "soak_files.txt"
    files_txt.write_text("\n".join(map(str, files)) + "\n")
    tag = save_bundle_to_bentoml(build_bundle(m, scratch / "bundles"), "bench_soak")
    seconds = args.soak * 60
    console.print(f"soak: wrk {args.soak_clients} connections x {seconds:.0f} s on {tag} ({source} images)")
    cmd, env, ready = server_specs(scratch, tag, 1)["service"]
    port = free_port()
    samples: list[tuple[float, dict[int, float]]] = []
    with server([*cmd, str(port)], env, port, ready, scratch / "soak.log") as proc:
        done = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not done.wait(5.0 if samples else 0.0):
                samples.append((time.monotonic() - t0, tree_rss_mb(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = run_wrk(port, files_txt, args.soak_clients, seconds, args.wrk_threads)
        finally:
            done.set()
            sampler.join()
    console.print(
        f"  status codes: {r['status_counts']}; {r['requests_per_s']:.1f} req/s (200s); p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms; 503s without Retry-After: {r['no_retry_after_503s']}; broken connections or "
        f"timeouts: {r['broken']}"
    )
    for t, rss in samples[:: max(1, len(samples) // 12)] + samples[-1:]:
        console.print(f"  t={t:6.0f} s  worker RSS MB: " + ", ".join(f"{v:.0f}" for v in rss.values()))
    growth = []
    base = next((rss for t, rss in samples if t >= 60), samples[0][1] if samples else {})
    for pid, mb0 in base.items():
        later = [rss[pid] for t, rss in samples if t >= 60 and pid in rss]
        if later:
            growth.append(max(later) / mb0 - 1)
    worst = max(growth) if growth else float("nan")
    codes = set(r["status_counts"]) - {"200", "503"}
    checks = [
        (f"soak: only 200 and 503 answers (other codes: {sorted(codes) or 'none'}; broken: {r['broken']})",
         not codes and not r["broken"]),
        (f"soak: worker RSS growth after the first minute {100 * worst:.1f}% (want <= 10%)", worst <= 0.10),
        (f"soak: 503s without Retry-After: {r['no_retry_after_503s']} (want 0)", r["no_retry_after_503s"] == 0),
    ]  # fmt: skip
    print_checks(console, checks)
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn,resnet18", help=f"comma-separated: {', '.join(SERVE_MODELS)}")
    p.add_argument("--servers", default="plain2,plain1,litserve,service", help=f"comma-separated: {', '.join(LABELS)}")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@DIR][:K=V,...]",
        help="our service again with these settings (b8:SVERTKA_MAX_BATCH_SIZE=8) and/or served from the checkout DIR",
    )
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 5; --quick 1)")
    p.add_argument("--connections", type=int, default=32, help="wrk's keep-alive connections")
    p.add_argument("--seconds", type=float, default=None, help="each wrk run (default 10; --quick 2)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (one keeps most CPU for the servers)")
    p.add_argument("--python-clients", type=int, default=32, help="tasks on the one aiohttp session; 0: no such runs")
    p.add_argument("--python-seconds", type=float, default=None, help="each Python run (default 5; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded wrk load per server first (default 3)")
    p.add_argument("--images", type=int, default=None, help="distinct request images (default 500; --quick 64)")
    p.add_argument("--data-root", default=None, help="data sets folder (default: $DATASETS_DIR)")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="only the soak run, this long")
    p.add_argument("--soak-clients", type=int, default=64, help="wrk connections of the soak run")
    p.add_argument("--quick", action="store_true", help="a smoke run: one repeat, short runs, few images")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.python_seconds = args.python_seconds or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.images = args.images or (64 if args.quick else 500)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.inproc_seconds = 1.0 if args.quick else 5.0
    args.tools = [t for t in TOOLS if t != "python" or args.python_clients > 0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if shutil.which("wrk") is None:
            raise BenchError("wrk is not installed: `sudo apt-get install wrk` (or `make wrk`)")
        keys = parse_list(args.models, list(SERVE_MODELS), "--models")
        args.servers = parse_list(args.servers, list(LABELS), "--servers")
        args.variant = [parse_variant(v, list(LABELS)) for v in args.variant]
        args.variant_env = [
            (name, ",".join([*([f"@{folder}"] if folder else []), *(f"{k}={v}" for k, v in env.items())]))
            for name, folder, env in args.variant
        ]
        if min(args.repeats, args.connections, args.images) < 1 or min(args.seconds, args.python_seconds) <= 0:
            raise BenchError("--repeats, --connections, --images and the run lengths must be positive")
        root = data_root(args.data_root)
        with tempfile.TemporaryDirectory(prefix="svertka-serve-load-") as tmp:
            scratch = Path(tmp)
            os.environ["BENTOML_HOME"] = str(scratch / "bentoml")  # a private model store, before bentoml loads
            settings = {k: v for k, v in os.environ.items() if k.startswith("SVERTKA_") and k != "SVERTKA_MODELS"}
            console.print(
                f"CPUs: {os.cpu_count()}, torch {torch.__version__}; {args.repeats} repeats of wrk {args.connections} "
                f"connections x {args.seconds:g} s and {args.python_clients} aiohttp tasks x {args.python_seconds:g} "
                f"s; service settings: {settings or 'defaults'}"
            )
            if args.soak is not None:
                write_json(args.json, args, {}, soak(args, scratch, root))
                return 0
            results = {key: bench_model(SERVE_MODELS[key], args, scratch, root) for key in keys}
    except BenchError as e:
        console.print(f"error: {e}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    write_json(args.json, args, results, report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
