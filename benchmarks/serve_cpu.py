"""Server CPU per request: our BentoML service against the plain uvicorn app, same requests, one run.

    python benchmarks/serve_cpu.py                              # simple_cnn, 1000 requests x (1, 32 clients) x 3
    python benchmarks/serve_cpu.py --models simple_cnn,resnet18 --requests 300 --repeats 3
    python benchmarks/serve_cpu.py --breakdown                  # also each server process's share
    python benchmarks/serve_cpu.py --variant b8:SVERTKA_MAX_BATCH_SIZE=8 --variant main@../main
        # more services beside ours: one with other settings, one from another checkout (its serving/)

Wall-clock requests/s on a shared machine swing with whatever else runs; the CPU time a server
spends per request hardly does. So this sends a fixed number of requests (``--requests``, from
one keep-alive client one after another, then from ``--clients`` concurrent ones) and reads the
user + system CPU time of the server's whole process tree (``bentoml serve``'s parent and its
workers; uvicorn's process) from ``/proc`` before and after: CPU ms per request. The servers
(``serve_load.py``'s plain app on as many workers as ours, and ours) both run for the whole benchmark and are
measured in turn, repeat after repeat, so drift hits both alike. The idle CPU of each tree (ms per second,
measured before the requests) is printed too: at one client it is part of each request's cost.

One caveat: with more than one torch thread, a forward pass's threads spin-wait for each other
(OpenMP), and on a machine whose cores are busy with other work they spin for whole scheduler
slices: CPU per request then grows with the machine's load. ``--torch-threads 1`` (every server,
the plain app included) takes that out and leaves the per-request cost of the serving stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _serve_common import (
    REPO,
    SERVE_MODELS,
    BenchError,
    build_bundle,
    build_request,
    data_root,
    free_port,
    parse_list,
    parse_variant,
    read_response,
    server,
    service_workers,
    tree_cpu_seconds,
)
from serve_load import server_specs, write_images

VARIANTS = ("plain2", "service")  # the plain app on as many workers as ours, and ours


def tree_cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds of each process in the tree of ``pid``, keyed by ``"pid name"`` (for ``--breakdown``)."""
    import psutil

    out = {}
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())
            name = "worker" if "worker" in cmd else ("parent" if p.pid == pid else p.name())
            out[f"{p.pid} {name}"] = t.user + t.system
    return out


async def send(port: int, requests: list[bytes], n: int, clients: int) -> int:
    """``n`` requests over ``clients`` keep-alive connections, each one at a time; -> non-200 answers."""
    bad = 0

    async def one(i: int) -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for k in range(i, n, clients):
            writer.write(requests[k % len(requests)])
            status, _, headers = await read_response(reader)
            bad += status != 200
            if headers.get("connection") == "close":  # the service's balancer moved us: reconnect
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    await asyncio.gather(*(one(i) for i in range(clients)))
    return bad


def measure(pid: int, port: int, requests: list[bytes], n: int, clients: int) -> tuple[float, float, int]:
    """-> (server CPU ms per request, wall seconds, errors) for ``n`` requests from ``clients`` clients."""
    cpu0, t0 = tree_cpu_seconds(pid), time.perf_counter()
    bad = asyncio.run(send(port, requests, n, clients))
    wall = time.perf_counter() - t0
    return 1000 * (tree_cpu_seconds(pid) - cpu0) / n, wall, bad


def idle_ms_per_s(pid: int, seconds: float = 2.0) -> float:
    cpu0 = tree_cpu_seconds(pid)
    time.sleep(seconds)
    return 1000 * (tree_cpu_seconds(pid) - cpu0) / seconds


def bench_model(key: str, args: argparse.Namespace, scratch: Path, root: Path | None) -> None:
    from models.store import save_bundle_to_bentoml

    m = SERVE_MODELS[key]
    files, source = write_images(m, root, scratch, 200)
    requests = [build_request("127.0.0.1", "/classify", "image", f.name, f.read_bytes()) for f in files]
    bundle = build_bundle(m, scratch / "bundles")
    tag = save_bundle_to_bentoml(bundle, f"bench_{key}")
    print(f"{key}: {len(files)} images from {source}; {args.requests} requests per measurement", flush=True)
    specs = {name: (*server_specs(bundle, tag, service_workers())[name], None) for name in VARIANTS}
    for name, folder, overrides in args.variant:
        cmd, env, ready = server_specs(bundle, tag, service_workers())["service"]
        env = {**env, **({"PYTHONPATH": str(folder)} if folder else {}), **overrides}  # overrides win
        specs[name] = (cmd, env, ready, folder)
    names = list(specs)
    results: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, (cmd, env, ready, folder) in specs.items():
            port = free_port()
            log = scratch / f"{key}_{name}.log"
            proc = stack.enter_context(server([*cmd, str(port)], env, port, ready, log, cwd=folder or REPO))
            procs[name] = (proc.pid, port)
        for name, (pid, port) in procs.items():
            measure(pid, port, requests, max(50, args.requests // 10), args.clients)  # warm-up, not counted
            print(f"  {name}: idle {idle_ms_per_s(pid):.1f} ms CPU per second", flush=True)
        for rep in range(args.repeats):
            for clients in (1, args.clients):
                for name in names if rep % 2 == 0 else names[::-1]:
                    pid, port = procs[name]
                    before = tree_cpu_by_process(pid) if args.breakdown else {}
                    ms, wall, bad = measure(pid, port, requests, args.requests, clients)
                    results.setdefault((name, clients), []).append(ms)
                    line = f"  repeat {rep + 1} {name:>10} {clients:>3} clients: {ms:6.2f} ms CPU/request"
                    print(f"{line}  ({args.requests / wall:6.1f} req/s wall, {bad} non-200)", flush=True)
                    if args.breakdown:
                        after = tree_cpu_by_process(pid)
                        shares = {k: 1000 * (v - before.get(k, 0.0)) / args.requests for k, v in after.items()}
                        print("      " + ", ".join(f"{k}: {v:.2f}" for k, v in shares.items() if v > 0.005))
    print(f"{key}: median (min-max) server CPU ms per request over {args.repeats} repeats")
    for clients in (1, args.clients):
        b = results[("plain2", clients)]
        print(f"  {clients:>3} clients: plain app {statistics.median(b):.2f} ({min(b):.2f}-{max(b):.2f})", flush=True)
        for name in names[1:]:
            s = results[(name, clients)]
            ratio = statistics.median(x / y for x, y in zip(s, b, strict=True))
            print(
                f"      {name:>10}: {statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f}); "
                f"over the plain app {ratio:.2f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="simple_cnn", help=f"comma-separated: {', '.join(SERVE_MODELS)}")
    p.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the second measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each server, alternating")
    p.add_argument("--data-root", default=None, help="data sets folder (default: $DATASETS_DIR)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@DIR][:K=V,...]",
        help="another service to measure: its settings (SVERTKA_...=...) and/or the checkout it is served from",
    )
    p.add_argument("--breakdown", action="store_true", help="print each server process's CPU ms per request")
    p.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads in every server (default: each its own)"
    )
    args = p.parse_args(argv)
    try:
        keys = parse_list(args.models, list(SERVE_MODELS), "--models")
        args.variant = [parse_variant(v, VARIANTS) for v in args.variant]
        if args.requests < 1 or args.clients < 1 or args.repeats < 1:
            raise BenchError("--requests, --clients and --repeats must be positive")
        root = data_root(args.data_root)
        if args.torch_threads:  # the plain app reads OMP_NUM_THREADS, the service its own settings
            n = str(args.torch_threads)
            os.environ.update(OMP_NUM_THREADS=n, SVERTKA_TORCH_THREADS=n)
        with tempfile.TemporaryDirectory(prefix="svertka-serve-cpu-") as tmp:
            os.environ["BENTOML_HOME"] = str(Path(tmp) / "bentoml")  # a private model store, before bentoml loads
            settings = {k: v for k, v in os.environ.items() if k.startswith("SVERTKA_") and k != "SVERTKA_MODELS"}
            print(f"CPUs: {os.cpu_count()}; service settings: {settings or 'defaults'}")
            for key in keys:
                bench_model(key, args, Path(tmp), root)
    except BenchError as e:
        print(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
