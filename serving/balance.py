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
its event loop first (usually the less loaded one). A balanced service closes nothing.

A connection it closed still counts in the worker's published number for ``leave_s``, until its
client is back (on either worker): otherwise the total would drop as a worker sheds, the share
with it, and the worker would shed again and again. That lets the closes come fast (one per
``cooldown_s``, 10 ms) without overshooting: a slow model's requests arrive in bursts, one per
forward batch, and at one close per 50 ms (the earlier rule, without that accounting) all 32
connections on one resnet18 worker took 9-10 s to even out; now ~2-4 s. Not faster still: closed
clients that reconnect at the same moment are a burst of accepts again, which one worker takes.
"""

from __future__ import annotations

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
        cooldown_s: float = 0.01,
        leave_s: float = 1.0,
    ) -> None:
        self.app, self.workers, self.window_s, self.slack, self.cooldown_s = app, workers, window_s, slack, cooldown_s
        self.leave_s = leave_s
        self.last_seen: dict[tuple[str, int], float] = {}  # client (host, port) -> last request time
        self.leaving: dict[tuple[str, int], float] = {}  # connections this worker closed -> when
        self.slots: memoryview | None = None
        self.index = 0
        self.next_prune = self.next_close = 0.0
        self.closed = 0

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
        self.last_seen[key] = now
        if now >= self.next_prune:
            cutoff = now - self.window_s
            self.last_seen = {k: t for k, t in self.last_seen.items() if t >= cutoff}
            self.leaving = {k: t for k, t in self.leaving.items() if t >= now - self.leave_s}
            self.next_prune = now + min(self.window_s, self.leave_s) / 4
        mine = len(self.last_seen)
        self.slots[self.index] = mine + len(self.leaving)
        share = math.ceil(sum(self.slots) / self.workers)
        if mine <= share + self.slack or now < self.next_close:
            return await self.app(scope, receive, send)
        self.next_close = now + self.cooldown_s
        self.closed += 1
        del self.last_seen[key]
        self.leaving[key] = now

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
