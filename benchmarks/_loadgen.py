"""The Python user's load: N tasks sharing one ``aiohttp.ClientSession`` for T seconds; a JSON summary out.

    python benchmarks/_loadgen.py --port 3000 --path /classify --files images.txt --clients 32 --seconds 10

What a Python user writes to send many requests at once (docs/SERVING.md): one session whose
connector holds N keep-alive connections, N tasks each posting one image after another (closed
loop). Many connections from C are ``wrk``'s job (``benchmarks/wrk_multipart.lua``); this is the
view from one Python session, with its own costs. A request counts from the call to reading the
whole answer; requests that start during ``--warmup`` are not recorded. Errors are non-2xx answers,
broken connections and requests over ``--timeout``. Prints one JSON object: requests, errors,
requests/s, latency percentiles (ms), status-code counts, 503s without ``Retry-After``, the load
generator's own CPU use and a few error samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def note_status(out: dict, status: int, headers, body: bytes, recorded: bool) -> str | None:
    """Count the status code (and a 503 without Retry-After); the error text for a non-2xx answer."""
    if recorded:
        out["status"][status] += 1
        if status == 503 and "retry-after" not in headers:
            out["no_retry_after"] += 1
    if 200 <= status < 300:
        return None
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


def record(out: dict, t0: float, t1: float, t_record: float, error: str | None) -> None:
    """Count one answer; past the warm-up, keep its latency and its error kind (with one sample)."""
    out["all"] += 1
    if t0 >= t_record:
        out["latency"].append(t1 - t0)
        out["end"] = max(out["end"], t1)
        if error:
            kind = error.split(":")[0]
            out["errors"][kind] += 1
            out["samples"].setdefault(kind, error)


async def task(i: int, session, url: str, files: list[tuple[str, bytes]], field: str, extra: dict[str, str],
               t_record: float, t_end: float, out: dict) -> None:  # fmt: skip
    """One task on the shared session: post, wait for the whole answer, repeat until ``t_end``."""
    import aiohttp

    k = i * 7919  # tasks start at different images
    while time.perf_counter() < t_end:
        name, data = files[k % len(files)]
        k += 1
        body = aiohttp.FormData(extra)
        body.add_field(field, data, filename=name, content_type=CONTENT_TYPES.get(Path(name).suffix.lower()))
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body) as r:
                error = note_status(out, r.status, r.headers, await r.read(), t0 >= t_record)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
            if not isinstance(e, asyncio.TimeoutError):
                await asyncio.sleep(0.05)  # a refused connection must not spin
        record(out, t0, time.perf_counter(), t_record, error)


async def run(args: argparse.Namespace, files: list[tuple[str, bytes]]) -> dict:
    import aiohttp

    now = time.perf_counter()
    t_record, t_end = now + args.warmup, now + args.warmup + args.seconds
    out: dict = {"latency": [], "errors": Counter(), "samples": {}, "end": t_record, "all": 0}
    out.update(status=Counter(), no_retry_after=0)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    url = f"http://{args.host}:{args.port}{args.path}"
    extra = dict(kv.split("=", 1) for kv in args.form)
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout)) as s:
        await asyncio.gather(
            *(task(i, s, url, files, args.field, extra, t_record, t_end, out) for i in range(args.clients))
        )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = np.asarray(out["latency"]) * 1000
    n, n_err = len(lat), sum(out["errors"].values())
    window = max(out["end"] - t_record, 1e-9)
    pct = np.percentile(lat, [50, 90, 99]) if n else [float("nan")] * 3
    return {
        "clients": args.clients,
        "seconds": round(window, 3),
        "requests": n,
        "errors": n_err,
        "requests_per_s": (n - n_err) / window,
        "p50_ms": float(pct[0]),
        "p90_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "max_ms": float(lat.max()) if n else float("nan"),
        "loadgen_cpu_fraction": cpu / (time.perf_counter() - now),  # of one core
        "status_counts": {str(k): v for k, v in sorted(out["status"].items())},
        "no_retry_after_503s": out["no_retry_after"],
        "error_kinds": dict(out["errors"]),
        "error_samples": list(out["samples"].values())[:5],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/classify")
    p.add_argument("--field", default="image", help="multipart field that carries the file")
    p.add_argument("--form", action="append", default=[], metavar="KEY=VALUE", help="extra text fields")
    p.add_argument("--files", type=Path, required=True, help="text file: one image path per line")
    p.add_argument("--clients", type=int, default=1, help="tasks (and connections of the session)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before recording starts")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [Path(s) for s in args.files.read_text().splitlines() if s.strip()]
    if not paths or args.clients < 1:
        print(f"error: --files {args.files} lists no images or --clients < 1", file=sys.stderr)
        return 1
    print(json.dumps(asyncio.run(run(args, [(p.name, p.read_bytes()) for p in paths]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
