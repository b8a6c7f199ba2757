"""Closed-loop HTTP load generator: N clients, each one request in flight, for T seconds; JSON summary out.

    python benchmarks/_loadgen.py --port 3000 --path /classify --files images.txt --clients 32 --seconds 10
    python benchmarks/_loadgen.py ... --client httpx          # one plain httpx.AsyncClient, N keep-alive connections
    python benchmarks/_loadgen.py ... --client aiohttp        # one plain aiohttp.ClientSession, N connections
    python benchmarks/_loadgen.py ... --client httpx2         # one httpx2.AsyncClient (httpx's maintained fork)

``--client raw`` (default) is kept cheap so the server gets most of the CPU: one process, one
asyncio loop, raw keep-alive HTTP/1.1 connections (one per client) and request bytes built once
before the clock starts (each file becomes a ``multipart/form-data`` upload in the field
``--field``). ``--client httpx`` is what a user would write first: one ``httpx.AsyncClient`` with
a pool of N keep-alive connections shared by N tasks. ``--client httpx-per-task``: N tasks, each
with its own ``httpx.AsyncClient`` (one keep-alive connection each). ``--client aiohttp``: one
``aiohttp.ClientSession`` (a ``TCPConnector`` of N connections) shared by N tasks, the other common
async client, whose pool hands a released connection straight to one waiting request (no race
like httpx's below). ``--client httpx2``: the same code as ``httpx`` on one ``httpx2.AsyncClient``,
Pydantic's maintained continuation of HTTPX (same API under the name ``httpx2``; its pool,
``httpcore2``, keeps an idle connection it handed to a request for that request).

Why so many httpx forms: httpcore's pool (1.0.9, the newest) hands an idle connection to a waiting
request but leaves it marked idle until that request's task runs, so when several responses
arrive in one pass of the client's event loop the requests that follow are all given the same
connection; all but one fail with ``ConnectionNotAvailable`` and go round again, and some lose
that race for a second or more (encode/httpcore#822, the review of #1111; fixed in httpx2 by
pydantic/httpx2#1075). The JSON reports how often that happened (``client_pool_retries``, counted
by wrapping the pool's retry step; None if the pool changed). It hits a client the faster its
server answers (more answers per pass).

A request counts from the client call (or writing its first byte) to reading its last; requests
that start during the warm-up are not recorded. Errors are non-2xx answers, broken connections
and requests over ``--timeout``. Prints one JSON object: requests, errors, requests/s, latency
percentiles (ms), status-code counts, 503s without ``Retry-After``, the load generator's own CPU
use, the httpx pool's retries, a few error samples, and with ``--latencies`` every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

BOUNDARY = "svertkabenchboundary7d1e"
CLIENTS = ("raw", "httpx", "httpx-per-task", "aiohttp", "httpx2")
# the HTTPX-API clients: the package each imports and its connection pool's package
HTTPX_PACKAGES = {
    "httpx": ("httpx", "httpcore"),
    "httpx-per-task": ("httpx", "httpcore"),
    "httpx2": ("httpx2", "httpcore2"),
}
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class Form(NamedTuple):
    """What each upload carries, for the clients that build their own requests (httpx, aiohttp)."""

    files: list[tuple[str, bytes]]  # (file name, bytes), taken in turn
    field: str  # the multipart field of the file
    extra: dict[str, str]  # text fields sent with it


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def build_request(host: str, path: str, field: str, name: str, data: bytes, extra: dict[str, str]) -> bytes:
    """One complete ``POST path`` request (headers + multipart body) as bytes."""
    ctype = content_type(name)
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in extra.items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{Path(name).name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: svertka-loadgen\r\nAccept: */*\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, str]]:
    """-> (status, body, lower-cased headers) of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await reader.readexactly(size + 2))  # data + CRLF
            if size == 0:
                break
        body = b"".join(c[:-2] for c in chunks)
    else:  # read to close
        body = await reader.read()
        headers["connection"] = "close"
    return status, body, headers


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


async def client(
    i: int, host: str, port: int, requests: list[bytes], t_record: float, t_end: float, timeout: float, out: dict
) -> None:
    """One closed-loop client: send, wait for the whole answer, repeat until ``t_end``."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    k = i * 7919  # clients start at different images
    while time.perf_counter() < t_end:
        req = requests[k % len(requests)]
        k += 1
        t0 = time.perf_counter()
        error = None
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            conn[1].write(req)
            status, body, headers = await asyncio.wait_for(read_response(conn[0]), timeout)
            if headers.get("connection") == "close":
                conn[1].close()
                conn = None
            error = note_status(out, status, headers, body, t0 >= t_record)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, asyncio.TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
            if conn is not None:
                conn[1].close()
            conn = None
            if not isinstance(e, asyncio.TimeoutError):
                await asyncio.sleep(0.05)  # a refused connection must not spin
        record(out, t0, time.perf_counter(), t_record, error)
    if conn is not None:
        conn[1].close()


def note_status(out: dict, status: int, headers: Any, body: bytes, recorded: bool) -> str | None:
    """Count the status code (and a 503 without Retry-After); the error text for a non-2xx answer."""
    if recorded:
        out["status"][status] += 1
        if status == 503 and "retry-after" not in headers:
            out["no_retry_after"] += 1
    if 200 <= status < 300:
        return None
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


async def httpx_client(
    i: int, http: Any, http_error: type[Exception], url: str, form: Form, t_record: float, t_end: float, out: dict
) -> None:
    """One task on an ``httpx.AsyncClient`` or ``httpx2.AsyncClient`` (shared or its own; ``http_error``: its
    package's ``HTTPError``): post, wait, repeat until ``t_end``."""
    k = i * 7919
    while time.perf_counter() < t_end:
        name, data = form.files[k % len(form.files)]
        k += 1
        t0 = time.perf_counter()
        try:
            r = await http.post(url, data=form.extra, files={form.field: (name, data, content_type(name))})
            error = note_status(out, r.status_code, r.headers, r.content, t0 >= t_record)
        except http_error as e:
            error = f"{type(e).__name__}: {e}"[:200]
            await asyncio.sleep(0.05)
        record(out, t0, time.perf_counter(), t_record, error)


async def aiohttp_client(i: int, session: Any, url: str, form: Form, t_record: float, t_end: float, out: dict) -> None:
    """One task on a shared ``aiohttp.ClientSession``: post, wait, repeat until ``t_end``."""
    import aiohttp

    k = i * 7919
    while time.perf_counter() < t_end:
        name, data = form.files[k % len(form.files)]
        k += 1
        body = aiohttp.FormData(form.extra)
        body.add_field(form.field, data, filename=name, content_type=content_type(name))
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body) as r:
                content = await r.read()
                error = note_status(out, r.status, r.headers, content, t0 >= t_record)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
            if not isinstance(e, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
        record(out, t0, time.perf_counter(), t_record, error)


@contextlib.contextmanager
def counting_pool_retries(out: dict, package: str = "httpcore") -> Iterator[None]:
    """Count in ``out["pool_retries"]`` each time the pool of ``package`` (httpcore, or httpx2's httpcore2) gives
    a request a connection that another request took first (it then clears the assignment and waits again).
    Behaviour is unchanged."""
    try:
        AsyncPoolRequest = importlib.import_module(f"{package}._async.connection_pool").AsyncPoolRequest
        original = AsyncPoolRequest.clear_connection
    except (ImportError, AttributeError):  # httpcore changed: not counted
        out["pool_retries"] = None
        yield
        return

    def clear_connection(self: Any) -> None:
        out["pool_retries"] += 1
        original(self)

    out["pool_retries"] = 0
    AsyncPoolRequest.clear_connection = clear_connection
    try:
        yield
    finally:
        AsyncPoolRequest.clear_connection = original


async def run(args: argparse.Namespace, requests: list[bytes], files: list[tuple[str, bytes]]) -> dict:
    now = time.perf_counter()
    t_record = now + args.warmup
    t_end = t_record + args.seconds
    out: dict = {"latency": [], "errors": Counter(), "samples": {}, "end": t_record, "all": 0}
    out.update(status=Counter(), no_retry_after=0)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    out["pool_retries"] = None
    url = f"http://{args.host}:{args.port}{args.path}"
    form = Form(files, args.field, dict(kv.split("=", 1) for kv in args.form))
    if args.client in HTTPX_PACKAGES:
        package, pool_package = HTTPX_PACKAGES[args.client]
        httpx = importlib.import_module(package)
        shared = args.client != "httpx-per-task"
        n = args.clients if shared else 1
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(counting_pool_retries(out, pool_package))
            https = [
                await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=args.timeout))
                for _ in range(1 if shared else args.clients)
            ]
            tasks = [
                httpx_client(i, https[0 if shared else i], httpx.HTTPError, url, form, t_record, t_end, out)
                for i in range(args.clients)
            ]
            await asyncio.gather(*tasks)
    elif args.client == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=args.clients)
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [aiohttp_client(i, session, url, form, t_record, t_end, out) for i in range(args.clients)]
            await asyncio.gather(*tasks)
    else:
        a = args
        tasks = [client(i, a.host, a.port, requests, t_record, t_end, a.timeout, out) for i in range(a.clients)]
        await asyncio.gather(*tasks)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = np.asarray(out["latency"]) * 1000
    n, n_err = len(lat), sum(out["errors"].values())
    window = max(out["end"] - t_record, 1e-9)
    pct = np.percentile(lat, [50, 95, 99]) if n else [float("nan")] * 3
    return {
        "clients": args.clients,
        "seconds": round(window, 3),
        "requests": n,
        "errors": n_err,
        "requests_per_s": (n - n_err) / window,
        "p50_ms": float(pct[0]),
        "p95_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "mean_ms": float(lat.mean()) if n else float("nan"),
        "max_ms": float(lat.max()) if n else float("nan"),
        "requests_with_warmup": out["all"],
        "loadgen_cpu_fraction": cpu / (time.perf_counter() - now),  # of one core
        "status_counts": {str(k): v for k, v in sorted(out["status"].items())},
        "no_retry_after_503s": out["no_retry_after"],
        "client": args.client,
        "client_pool_retries": out["pool_retries"],  # httpx/httpx2: requests the pool re-queued (None: others)
        "error_kinds": dict(out["errors"]),
        "error_samples": list(out["samples"].values())[:5],
        **({"latencies_ms": [round(float(x), 4) for x in lat]} if getattr(args, "latencies", False) else {}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/classify")
    p.add_argument("--field", default="image", help="multipart field that carries the file")
    p.add_argument("--form", action="append", default=[], metavar="KEY=VALUE", help="extra text fields")
    p.add_argument("--files", type=Path, required=True, help="text file: one image path per line")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before recording starts")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default="raw",
        help="raw sockets, one httpx.AsyncClient shared by all clients, one httpx.AsyncClient per client, "
        "one aiohttp.ClientSession shared by all clients, or one httpx2.AsyncClient shared by all clients",
    )
    p.add_argument("--latencies", action="store_true", help="also list every recorded latency (ms), to pool runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [Path(s) for s in args.files.read_text().splitlines() if s.strip()]
    if not paths or args.clients < 1:
        print(f"error: --files {args.files} lists no images or --clients < 1", file=sys.stderr)
        return 1
    extra = dict(kv.split("=", 1) for kv in args.form)
    host = f"{args.host}:{args.port}"
    files = [(p.name, p.read_bytes()) for p in paths]
    requests = [build_request(host, args.path, args.field, name, data, extra) for name, data in files]
    print(json.dumps(asyncio.run(run(args, requests, files))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
