"""Even out keep-alive connections across the service's worker processes.

Why: ``bentoml serve`` (1.4) hands every worker the same listening socket, and an asyncio
server accepts up to ``backlog`` (>= 64) waiting connections per wake-up. When 32 clients connect
at once, the first worker to wake takes all or most of them and keeps them for their whole
keep-alive life: one worker runs flat out while the other idles, and the connections on the busy
one wait behind each other (the measured p99 of 17x the median). BentoML 1.4 offers no public
hook to give each worker its own ``SO_REUSEPORT`` socket, so this middleware fixes the balance
at the HTTP level instead.

How: each worker counts the client connections it served in the last ``window_s`` and publishes
the count in a tiny shared file (one int32 slot per worker). A worker holding more than its share
(``ceil(total / workers)``, plus ``slack``) answers the current request normally but with
``Connection: close``; the client reconnects, and the accept goes to whichever worker is idle in
its event loop first. A balanced service closes nothing.

Three rules make it converge in one round, which matters for a slow model: its requests arrive in
bursts one forward batch apart, and the first answers to a fresh set of connections come only
after the crowded worker's whole queue (1.5 s for 30 resnet18 requests on one worker).
- A closed connection stays in the worker's published number until ``leave_s`` after its close
  went out, or until a new client shows up here (most likely it, back): otherwise the total would
  drop as a worker sheds, the share with it, and the worker would shed again and again.
- A closed client comes back to the same worker with odds ``1 / workers`` (measured: 8 of 13 came
  back, 5 moved, when one worker closed its excess of 13). So a worker sheds until its own count
  plus the closed ones it expects back is within its share: 30 here and 2 there, it closes 26 and
  keeps 4, expecting 13 of them back.
- The decision is made when a request arrives, but the responses that carry a close leave
  ``spacing_s`` (10 ms) apart: closed clients that reconnect at the same moment are one burst of
  accepts, and one worker's accept loop takes a whole burst. A response waits at most
  ``max_wait_s`` (0.3 s) for its slot; past that it keeps its connection.
Clients that open a new connection for every request (curl in a loop, ``requests.post`` without a
session) are left alone: a connection used once counts only until ``once_s`` (0.25 s) after its
answer, and when fewer than half of a worker's recent requests (a moving average over ~100) came on
a connection it had seen before, it closes nothing: a close would move nothing, and the spaced
closes would only queue up (simple_cnn, 8 such clients: 369 req/s and p99 81 ms without these two
rules, 1,072 req/s and p99 18 ms with them).
Measured with 32 raw clients on fresh connections (2 workers, 2 cores; latencies per 0.5 s and the
shared counts file): resnet18's latencies even from ~1.5-2 s after the start, the first round of
answers (it was 2-4 s with one close per 10 ms and no expected returns; 9-10 s at one close per
50 ms before the accounting); simple_cnn's within 1.5 s.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import tempfile
import time
from pathlib import Path

import bentoml
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ConnectionBalancer:
    """ASGI middleware: ``Connection: close`` on a response when this worker holds more than its share."""

    def __init__(
        self,
        app: ASGIApp,
        workers: int,
        window_s: float = 2.0,
        slack: int = 1,
        spacing_s: float = 0.01,
        leave_s: float = 1.0,
        max_wait_s: float = 0.3,
        once_s: float = 0.25,
    ) -> None:
        self.app, self.workers, self.window_s, self.slack, self.spacing_s = app, workers, window_s, slack, spacing_s
        self.leave_s, self.max_wait_s, self.once_s = leave_s, max_wait_s, once_s
        self.reuse = 1.0  # share of recent requests that came on a connection seen before (a moving average)
        # Connections counted as this worker's: used more than once in the last window_s, or used once and
        # either still waiting for that answer or within once_s of it (a client that opens a connection per
        # request would otherwise fill the count with connections long gone).
        self.last_seen: dict[tuple[str, int], float] = {}  # client (host, port), 2+ requests -> last request time
        self.once: dict[tuple[str, int], float] = {}  # client, 1 request so far -> its time
        self.active: set[tuple[str, int]] = set()  # clients with a request in flight here
        self.leaving: dict[tuple[str, int], float] = {}  # closed here -> when the close went out (inf: still queued)
        self.slots: memoryview | None = None
        self.index = 0
        self.next_prune = self.next_close = 0.0
        self.closed = 0

    @property
    def held(self) -> int:
        """The client connections counted as this worker's now (closed ones on their way out not included)."""
        return len(self.last_seen) + len(self.once)

    def _open_slots(self, scope: Scope) -> memoryview | None:
        """The shared counts file of this service (named by the parent process and the port)."""
        index = bentoml.server_context.worker_index
        if index is None or not 1 <= index <= self.workers:
            return None
        port = (scope.get("server") or ("", 0))[1]
        folder = Path(tempfile.gettempdir())
        for old in folder.glob("svertka-conns-*-*"):  # files of services that have stopped
            pid = old.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                old.unlink(missing_ok=True)
        path = folder / f"svertka-conns-{os.getppid()}-{port}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 4 * self.workers:
                os.ftruncate(fd, 4 * self.workers)
            mm = mmap.mmap(fd, 4 * self.workers)
        finally:
            os.close(fd)
        self.index = index - 1
        return memoryview(mm).cast("i")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client:
            return await self.app(scope, receive, send)
        if self.slots is None:
            self.slots = self._open_slots(scope)
            if self.slots is None:  # not under `bentoml serve` workers (to_asgi(), tests): nothing to balance
                self.workers = 0
        if not self.workers:
            return await self.app(scope, receive, send)
        now = time.monotonic()
        key = (client[0], client[1])
        reused = key in self.last_seen or self.once.pop(key, None) is not None
        self.reuse += 0.01 * (reused - self.reuse)
        if reused:
            self.last_seen[key] = now
        else:
            self.once[key] = now
            if self.leaving:  # most likely a client this worker closed, back here
                sent = min(self.leaving, key=self.leaving.__getitem__)
                if self.leaving[sent] < math.inf:
                    del self.leaving[sent]
        if now >= self.next_prune:
            cutoff = now - self.window_s
            self.last_seen = {k: t for k, t in self.last_seen.items() if t >= cutoff}
            self.once = {k: t for k, t in self.once.items() if t >= now - self.once_s or k in self.active}
            self.leaving = {k: t for k, t in self.leaving.items() if t >= now - self.leave_s}
            self.next_prune = now + min(self.window_s, self.leave_s, self.once_s) / 4
        mine = self.held
        self.slots[self.index] = mine + len(self.leaving)
        share = math.ceil(sum(self.slots) / self.workers)
        self.active.add(key)
        try:
            # Count the closed clients expected back here (1 in `workers`), so that one round of closes sheds the
            # excess. Clients that open a connection per request (most requests on new connections) are not
            # balanced: a close moves nothing, and the spaced closes would only queue up behind each other.
            if mine + len(self.leaving) / self.workers <= share + self.slack or self.reuse < 0.5:
                return await self.app(scope, receive, send)
            await self._close_after(key, scope, receive, send)
        finally:
            self.active.discard(key)
            if key in self.once:  # once_s counts from the answer: a queued request may have waited seconds
                self.once[key] = time.monotonic()

    async def _close_after(self, key: tuple[str, int], scope: Scope, receive: Receive, send: Send) -> None:
        """Answer this request with ``Connection: close`` (in its slot), counting the client as leaving."""
        self.closed += 1
        self.last_seen.pop(key, None)
        self.once.pop(key, None)
        self.leaving[key] = math.inf  # counted from when the close goes out: a queued request may wait seconds

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Take the next free slot, spacing_s after the previous close, so that reconnects come one by one.
                now = time.monotonic()
                wait = max(0.0, self.next_close - now)
                if wait > self.max_wait_s:  # too many closes queued already: keep this connection after all
                    self.leaving.pop(key, None)
                    self.last_seen[key] = now  # (it was seen before or it goes on: counted either way)
                    self.closed -= 1
                    return await send(message)
                self.next_close = max(now, self.next_close) + self.spacing_s
                if wait:
                    await asyncio.sleep(wait)
                self.leaving[key] = time.monotonic()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, closing_send)
        finally:
            if self.leaving.get(key) == math.inf:  # no response went out (the client left): stop counting it soon
                self.leaving[key] = time.monotonic()
