"""HTTP serving under load: our BentoML service against a plain one-worker uvicorn app, same images, one run.

The must-show numbers of issue #9 (on a quiet 2-core machine; each prints its checks at the end):

    python benchmarks/serve_load.py             # simple_cnn + resnet18, 1 and 32 clients, 10 s each,
                                                # raw-socket, httpx, aiohttp and httpx2 clients, baseline beside ours
    python benchmarks/serve_load.py --soak 5    # 64 clients x 5 min on simple_cnn: status codes,
                                                # worker RSS over time, Retry-After on every 503
    python benchmarks/serve_load.py --quick     # smoke test: a few seconds per run
    python benchmarks/serve_load.py --models simple_cnn --clients 1,8,32 --seconds 20 --json out.json

For each model it measures (a) the model in this process (decode + preprocess + forward, one
image at a time and in batches of 32: the upper bound), (b) the baseline, a plain Starlette app
under ``uvicorn --workers 1`` doing the same decode and forward inline per request
(``benchmarks/_serve_baseline.py``), and (c) our service (``bentoml serve`` at the repo root,
settings from the ``SVERTKA_*`` environment as a user would set them). The load comes from
``benchmarks/_loadgen.py`` (a separate, cheap process: N closed-loop keep-alive clients for T
seconds after a warm-up), with its raw-socket clients, with one plain ``httpx.AsyncClient``
holding N keep-alive connections, with N ``httpx.AsyncClient``s of one connection each, with
one plain ``aiohttp.ClientSession`` of N connections, and with one ``httpx2.AsyncClient`` (httpx's
maintained continuation) of N connections (``--loadgen``; the shared pools' retries, an httpcore
race that httpx2 fixed, are reported: see ``_loadgen.py``).
The servers run side by side and take turns (baseline, ours, then ours, baseline, ...), so the
slow drift of a noisy machine hits both alike. A one-client load, whose check is a ratio of
medians of ~1 ms, is split into ``--repeats`` short alternating runs per server, pooled
(latencies merged, counts summed; each run's p50 printed too); loads of more clients run once per
server, continuously, since a fresh set of connections takes the service a second or two to
spread over its workers and a p99 needs a long steady run. After each run against our service it
reads ``GET /stats`` of every worker: the mean forward batch size. Models:
``simple_cnn`` on Fashion-MNIST 28x28 PNGs (overhead-bound) and ``resnet18`` on UTKFace 200x200
JPEGs resized to 224 (compute-bound), both with random weights (throughput does not depend on
them). Images come from ``--data-root`` or ``$DATASETS_DIR``; without either, synthetic images
(said in the output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from _loadgen import CLIENTS
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

TARGETS = {"simple_cnn": 1.2, "resnet18": 1.3}  # our requests/s over the baseline's, at 32 clients (issue #9)
LABELS = {
    "baseline": "(b) baseline (uvicorn, 1 worker)",
    "service": "(c) our service (bentoml serve)",
    "bento_batching": "(d) BentoML adaptive batching (batchable API)",
}
P50_TARGET = 1.25  # one client: our median latency at most this times the baseline's
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


def run_load(
    port: int,
    files_txt: Path,
    clients: int,
    seconds: float,
    warmup: float,
    client: str = "raw",
    latencies: bool = False,
) -> dict:
    """One load-generator run against ``127.0.0.1:port`` (a separate process); ``latencies``: list each one."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "_loadgen.py"), "--port", str(port), "--path", "/classify"]
    cmd += ["--files", str(files_txt), "--clients", str(clients), "--seconds", str(seconds), "--warmup", str(warmup)]
    cmd += ["--client", client] + (["--latencies"] if latencies else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 180)
    if r.returncode != 0:
        raise BenchError(f"load generator failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def worker_stats(port: int, tries: int = 12) -> dict[int, dict]:
    """``GET /stats`` on fresh connections until every worker answered (or ``tries``): pid -> its counters."""
    import httpx

    seen: dict[int, dict] = {}
    for _ in range(tries):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10, headers={"Connection": "close"})
            if r.status_code == 200:
                seen[r.json()["pid"]] = r.json()
        except httpx.HTTPError:
            pass
    return seen


def batch_counts(before: dict[int, dict], after: dict[int, dict]) -> tuple[int, int]:
    """(forward batches, requests in them) between two ``worker_stats`` snapshots (workers seen both times)."""
    batches = items = 0
    for pid, a in after.items():
        b = before.get(pid, {"batches": 0, "batched_requests": 0})
        batches += a["batches"] - b["batches"]
        items += a["batched_requests"] - b["batched_requests"]
    return batches, items


def server_specs(bundle: Path, tag: str) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """Each server variant: its command (the port goes last), environment and readiness path."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
    return {
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
        "bento_batching": (
            [str(Path(sys.executable).parent / "bentoml"), "serve", "benchmarks._serve_bentoml_batching:BentoBatching"]
            + ["--host", "127.0.0.1", "--port"],
            {**env, "SVERTKA_BENCH_BUNDLE": str(bundle)},
            "/readyz",
        ),
    }


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

    servers = {k: v for k, v in server_specs(bundle, tag).items() if k in args.variants}
    with contextlib.ExitStack() as stack:  # all servers up at once: their runs alternate (drift hits each alike)
        ports: dict[str, tuple[int, subprocess.Popen]] = {}
        for name, (cmd, server_env, ready) in servers.items():
            port = free_port()
            console.print(f"  {LABELS[name]} on port {port} ...")
            log = scratch / f"{m.key}_{name}.log"
            ports[name] = (port, stack.enter_context(server([*cmd, str(port)], server_env, port, ready, log)))
        for name, (port, _) in ports.items():  # first requests are slow (allocations, lazy set-up): not measured
            result[name] = {}
            run_load(port, files_txt, 8, max(args.warmup, 1.0), 0.0)
        turn = 0
        for loadgen in args.loadgen:
            for clients in args.clients:
                # One client: short runs alternating A B, B A, A B (a steady drift cancels out too). More
                # clients: one long run each (a fresh set of connections takes the service a second or two
                # to spread over its workers, and a p99 needs a long steady run), still in alternating order.
                repeats = args.repeats if clients == 1 else 1
                slices: dict[str, list[dict]] = {name: [] for name in servers}
                for _ in range(repeats):
                    for name, (port, proc) in list(ports.items())[:: -1 if turn % 2 else 1]:
                        r = measure_slice(name, port, proc, files_txt, clients, args.seconds / repeats, args, loadgen)
                        slices[name].append(r)
                    turn += 1
                for name, runs in slices.items():
                    r = result[name][f"{loadgen}:{clients}"] = pool_slices(runs)
                    print_run(LABELS[name].split(" (")[0], loadgen, clients, r)
    return result


def measure_slice(
    name: str,
    port: int,
    proc: subprocess.Popen,
    files_txt: Path,
    clients: int,
    seconds: float,
    args: argparse.Namespace,
    loadgen: str,
) -> dict:
    """One load-generator run against one server, with the server's CPU use (and batches: our service)."""
    stats0 = worker_stats(port) if name == "service" else {}
    cpu0, t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
    r = run_load(port, files_txt, clients, seconds, args.warmup, loadgen, latencies=True)
    r["server_cpu_s"] = tree_cpu_seconds(proc.pid) - cpu0
    r["elapsed_s"] = time.perf_counter() - t0
    r["batch_counts"] = batch_counts(stats0, worker_stats(port)) if name == "service" else None
    return r


def pool_slices(runs: list[dict]) -> dict:
    """Alternating runs of one server -> one result: their latencies pooled, counts summed; the spread kept."""
    import numpy as np

    lat = np.concatenate([np.asarray(r.pop("latencies_ms"), dtype=float) for r in runs])
    n_ok = sum(r["requests"] - r["errors"] for r in runs)
    window = sum(r["seconds"] for r in runs)
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    out = {
        "clients": runs[0]["clients"],
        "client": runs[0]["client"],
        "seconds": window,
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "requests_per_s": n_ok / window if window else 0.0,
        "p50_ms": float(pct[0]),
        "p95_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
        "max_ms": float(lat.max()) if len(lat) else float("nan"),
        "requests_with_warmup": sum(r["requests_with_warmup"] for r in runs),
        "loadgen_cpu_fraction": sum(r["loadgen_cpu_fraction"] for r in runs) / len(runs),
        "status_counts": dict(sum((Counter(r["status_counts"]) for r in runs), Counter())),
        "no_retry_after_503s": sum(r["no_retry_after_503s"] for r in runs),
        "client_pool_retries": None,
        "error_kinds": dict(sum((Counter(r["error_kinds"]) for r in runs), Counter())),
        "error_samples": [e for r in runs for e in r["error_samples"]][:5],
        "slices": [{k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors")} for r in runs],
    }
    if all(r["client_pool_retries"] is not None for r in runs):
        out["client_pool_retries"] = sum(r["client_pool_retries"] for r in runs)
    cpu, elapsed = sum(r["server_cpu_s"] for r in runs), sum(r["elapsed_s"] for r in runs)
    out["server_cpu_cores"] = cpu / elapsed if elapsed else 0.0
    out["server_cpu_ms_per_request"] = 1000 * cpu / max(out["requests_with_warmup"], 1)
    counts = [r["batch_counts"] for r in runs if r["batch_counts"] is not None]
    batches, items = sum(c[0] for c in counts), sum(c[1] for c in counts)
    out["mean_batch_size"] = items / batches if batches else None
    return out


def print_run(label: str, loadgen: str, clients: int, r: dict) -> None:
    """One console line per (server, client, clients): pooled numbers, then each slice's p50."""
    extra = f", mean batch {r['mean_batch_size']:.1f}" if r["mean_batch_size"] else ""
    if r.get("client_pool_retries") is not None:
        extra += f", pool retries {r['client_pool_retries'] / max(r['requests_with_warmup'], 1):.2f}/request"
    spread = "/".join(f"{s['p50_ms']:.1f}" for s in r["slices"])
    console.print(
        f"    {label:<16} {loadgen:>14} {clients:>3} clients: {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} "
        f"ms (runs {spread})  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  server CPU "
        f"{r['server_cpu_ms_per_request']:.1f} ms/request ({r['server_cpu_cores']:.2f} cores), "
        f"load generator {r['loadgen_cpu_fraction']:.2f} cores{extra}"
    )
    for sample in r["error_samples"][:2]:
        console.print(f"      error: {sample}", markup=False, style="red")


def report(results: dict, clients: list[int], loadgens: list[str]) -> list[tuple[str, bool]]:
    """Print the table and the ratios; return ``(target, met)`` pairs."""
    table = Table(
        title="Serving under load (requests/s; latency in ms; server CPU ms per request)",
        caption="(a): images/s of decode + preprocess + forward in this process, the upper bound; "
        "CPU/req: CPU time of the server's process tree per request; of (a): req/s over the better (a); "
        "batch: mean forward batch size the service reports; random weights",
    )
    cols = ("model", "run", "client", "clients", "req/s", "p50", "p95", "p99", "errors", "CPU/req", "of (a)", "batch")
    for col in (*cols, "ours/base"):
        table.add_column(col, justify="left" if col in ("model", "run", "client") else "right")
    for key, r in results.items():
        ip = r["in_process"]
        bound = max(ip["single_images_per_s"], ip["batched_images_per_s"])
        table.add_row(
            key, "(a) in process, 1 by 1", "-", "-", f"{ip['single_images_per_s']:.1f}", f"{ip['single_ms']:.1f}"
        )
        table.add_row(key, "(a) in process, batch 32", "-", "-", f"{ip['batched_images_per_s']:.1f}")
        for lg in loadgens:
            for c in clients:
                b = r["baseline"][f"{lg}:{c}"]
                for variant in [v for v in LABELS if v in r]:
                    x = r[variant][f"{lg}:{c}"]
                    name = LABELS[variant].split(" (")[0] if variant != "bento_batching" else "(d) BentoML batching"
                    ratio = x["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
                    cells = [f"{x[k]:.1f}" for k in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms")]
                    cpu, of_a = x["server_cpu_ms_per_request"], x["requests_per_s"] / bound
                    mb = f"{x['mean_batch_size']:.1f}" if x.get("mean_batch_size") else ""
                    cells += [str(x["errors"]), f"{cpu:.1f}", f"{of_a:.2f}", mb]
                    table.add_row(key, name, lg, str(c), *cells, f"{ratio:.2f}x" if variant != "baseline" else "")
        table.add_section()
    console.print(table)

    checks: list[tuple[str, bool]] = []
    top = 32 if 32 in clients else max(clients)
    lead = "raw" if "raw" in loadgens else loadgens[0]  # the client of the speed checks: raw, or the one run
    for key, r in results.items():
        ours, base = r["service"], r["baseline"]
        if 1 in clients:
            p50, b50 = ours[f"{lead}:1"]["p50_ms"], base[f"{lead}:1"]["p50_ms"]
            want = f"<= {P50_TARGET}x the baseline's {b50:.1f} ms"
            checks.append((f"{key}, {lead}, 1 client: our p50 {p50:.1f} ms {want}", p50 <= P50_TARGET * b50))
        s, b = ours[f"{lead}:{top}"], base[f"{lead}:{top}"]
        ratio = s["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
        want = TARGETS.get(key, 1.0)
        checks.append(
            (f"{key}, {lead}, {top} clients: ours / baseline req/s = {ratio:.2f}x (want >= {want}x)", ratio >= want)
        )
        for lg in loadgens:
            s = ours[f"{lg}:{top}"]
            checks.append((f"{key}, {lg}, {top} clients: {s['errors']} errors (want 0)", s["errors"] == 0))
            ratio_p = s["p99_ms"] / s["p50_ms"] if s["p50_ms"] else float("inf")
            why = ""
            if s.get("client_pool_retries"):  # the httpcore race (see _loadgen.py): the baseline's beside ours
                b = base[f"{lg}:{top}"]
                per = [x["client_pool_retries"] / max(x["requests_with_warmup"], 1) for x in (s, b)]
                why = f"; httpx pool retries per request {per[0]:.2f} (baseline's {per[1]:.2f}, p99/p50 "
                why += f"{b['p99_ms'] / b['p50_ms']:.2f})" if b["p50_ms"] else "-)"
            checks.append((f"{key}, {lg}, {top} clients: p99 / p50 = {ratio_p:.2f} (want <= 3){why}", ratio_p <= 3))
        mb = ours[f"{lead}:{top}"].get("mean_batch_size") or 0
        checks.append((f"{key}, {lead}, {top} clients: mean forward batch {mb:.2f} (want > 1)", mb > 1))
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
    """64 clients (``--soak-clients``) for ``--soak`` minutes against simple_cnn: codes, RSS, Retry-After."""
    import threading

    from models.store import save_bundle_to_bentoml

    m = SERVE_MODELS["simple_cnn"]
    files, source = write_images(m, root, scratch, args.images)
    files_txt = scratch / "soak_files.txt"
    files_txt.write_text("\n".join(map(str, files)) + "\n")
    tag = save_bundle_to_bentoml(build_bundle(m, scratch / "bundles"), "bench_soak")
    seconds = args.soak * 60
    console.print(f"soak: {args.soak_clients} clients x {seconds:.0f} s on {tag} ({source} images)")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1", "SVERTKA_MODELS": tag}
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "--host", "127.0.0.1", "--port"]
    port = free_port()
    samples: list[tuple[float, dict[int, float]]] = []
    with server([*cmd, str(port)], env, port, "/readyz", scratch / "soak.log") as proc:
        done = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not done.wait(5.0 if samples else 0.0):
                samples.append((time.monotonic() - t0, tree_rss_mb(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = run_load(port, files_txt, args.soak_clients, seconds, 0.0, "raw")
        finally:
            done.set()
            sampler.join()
    console.print(
        f"  status codes: {r['status_counts']}; {r['requests_per_s']:.1f} req/s (200s); "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; 503s without Retry-After: "
        f"{r['no_retry_after_503s']}; broken connections/timeouts: "
        f"{ {k: v for k, v in r['error_kinds'].items() if not k.startswith('HTTP')} }"
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
    other = {k: v for k, v in r["error_kinds"].items() if not k.startswith("HTTP")}
    checks = [
        (f"soak: only 200 and 503 answers (other codes: {sorted(codes) or 'none'}; broken: {other or 'none'})",
         not codes and not other),
        (f"soak: worker RSS growth after the first minute {100 * worst:.1f}% (want <= 10%)", worst <= 0.10),
        (f"soak: 503s without Retry-After: {r['no_retry_after_503s']} (want 0)", r["no_retry_after_503s"] == 0),
    ]  # fmt: skip
    print_checks(console, checks)
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn,resnet18", help=f"comma-separated: {', '.join(SERVE_MODELS)}")
    p.add_argument("--clients", default="1,32", help="comma-separated concurrent client counts")
    p.add_argument("--seconds", type=float, default=None, help="recorded load per run (default 10; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded load first (default 2; --quick 0.5)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="one-client loads are split into this many runs that alternate between the servers, pooled "
        "(default 3; --quick 1): slow drift of a noisy machine then hits the baseline and ours alike",
    )
    p.add_argument("--images", type=int, default=None, help="distinct request images (default 500; --quick 64)")
    p.add_argument("--data-root", default=None, help="data sets folder (default: $DATASETS_DIR)")
    p.add_argument(
        "--loadgen",
        default=",".join(CLIENTS),
        help="comma-separated clients: raw (sockets), httpx (one shared AsyncClient), httpx-per-task (one each), "
        "aiohttp (one shared ClientSession), httpx2 (one shared httpx2.AsyncClient)",
    )
    p.add_argument("--variants", default="baseline,service", help=f"servers to run: {', '.join(LABELS)}")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="only the soak run, this long")
    p.add_argument("--soak-clients", type=int, default=64, help="clients of the soak run")
    p.add_argument("--quick", action="store_true", help="a smoke run: short runs, few images")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.images = args.images or (64 if args.quick else 500)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.inproc_seconds = 1.0 if args.quick else 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        keys = parse_list(args.models, list(SERVE_MODELS), "--models")
        args.loadgen = parse_list(args.loadgen, list(CLIENTS), "--loadgen")
        args.variants = parse_list(args.variants, list(LABELS), "--variants")
        if not {"baseline", "service"} <= set(args.variants) and args.soak is None:
            raise BenchError("--variants must include baseline and service (the ratios are ours over the baseline's)")
        try:
            args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
        except ValueError:
            raise BenchError(f"--clients {args.clients!r}: expected comma-separated integers") from None
        if not args.clients or min(args.clients) < 1 or args.seconds <= 0 or args.images < 1 or args.repeats < 1:
            raise BenchError("--clients, --seconds, --images and --repeats must be positive")
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
    write_json(args.json, args, results, report(results, args.clients, args.loadgen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
