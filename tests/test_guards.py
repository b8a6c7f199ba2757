"""The HTTP guards and the connection balancer as ASGI middleware, in process (the real server: test_serving.py).

pytest tests/test_guards.py
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import bentoml
import pytest

from serving.balance import ConnectionBalancer
from serving.guards import AdmissionMiddleware, JsonRoutingErrors
from serving.settings import Settings, SettingsError


def http_scope(path: str = "/classify", client: tuple[str, int] = ("127.0.0.1", 5000)) -> dict:
    return {"type": "http", "path": path, "method": "POST", "headers": [], "client": client, "server": ("h", 1)}


async def call(app, scope: dict, body: bytes = b"x" * 10) -> tuple[int, dict, bytes]:
    """Run one request through ``app``: (status, headers, body)."""
    chunks = [{"type": "http.request", "body": body[:5], "more_body": True},
              {"type": "http.request", "body": body[5:], "more_body": False}]  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_admission_refuses_past_the_limit_with_retry_after() -> None:
    release = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> list[tuple[int, dict, bytes]]:
        guard = AdmissionMiddleware(slow_app, max_in_flight=2)
        held = [asyncio.create_task(call(guard, http_scope())) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call(guard, http_scope())  # answers at once, while two are held
        probe = asyncio.create_task(call(guard, http_scope("/readyz")))  # probes are never refused
        release.set()
        done = await asyncio.gather(*held, probe)
        assert guard.in_flight == 0 and guard.refused == 1
        return [refused, *done, await call(guard, http_scope())]

    refused, *served = asyncio.run(main())
    assert refused[0] == 503 and refused[1]["retry-after"] == "1"
    assert "SVERTKA_MAX_IN_FLIGHT" in json.loads(refused[2])["error"]
    assert [s[0] for s in served] == [200, 200, 200, 200]


def test_routing_errors_become_json_and_everything_else_passes_untouched() -> None:
    """Plain-text 404 / 405 (streamed in two parts here) -> JSON; the app's own JSON 404 and a 200 as they were."""

    def app_answering(status: int, content_type: bytes, parts: list[bytes], allow: bytes | None = None):
        async def app(scope, receive, send) -> None:
            headers = [(b"content-type", content_type)] + ([(b"allow", allow)] if allow else [])
            await send({"type": "http.response.start", "status": status, "headers": headers})
            for i, part in enumerate(parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

        return JsonRoutingErrors(app, endpoints="POST /classify, GET /models")

    plain = b"text/plain; charset=utf-8"
    scope = {**http_scope("/nope"), "method": "GET"}
    status, headers, body = asyncio.run(call(app_answering(404, plain, [b"Not ", b"Found"]), scope))
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "GET /nope: no such endpoint; the API: POST /classify, GET /models"}

    status, headers, body = asyncio.run(call(app_answering(405, plain, [b"Method Not Allowed"], b"POST"), scope))
    assert status == 405 and headers["allow"] == "POST" and "use POST" in json.loads(body)["error"]

    own = [b'{"error": "no regression model is served"}']
    assert asyncio.run(call(app_answering(404, b"application/json", own), scope)) == (
        404, {"content-type": "application/json"}, own[0]
    )  # fmt: skip
    ok = asyncio.run(call(app_answering(200, plain, [b"o", b"k"]), scope))
    assert ok == (200, {"content-type": plain.decode()}, b"ok")


def test_admission_counts_the_clients_of_the_last_window() -> None:
    """One keep-alive client is one client however many requests it sends; others count until they go quiet;
    a connection used for one request only (a client that reconnects each time) is not counted."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> list[int]:
        guard = AdmissionMiddleware(app, max_in_flight=4, window_s=0.2)
        counts = []
        for _ in range(3):
            await call(guard, http_scope(client=("127.0.0.1", 5000)))
        for port in range(7000, 7050):  # one request per connection: not clients that stay
            await call(guard, http_scope(client=("127.0.0.1", port)))
        counts.append(guard.recent_clients)
        for port in (5001, 5002, 5001, 5002):
            await call(guard, http_scope(client=("127.0.0.1", port)))
        for _ in range(2):
            await call(guard, http_scope("/readyz", client=("127.0.0.1", 5009)))  # probes are not clients,
            await call(guard, {**http_scope("/stats", client=("127.0.0.1", 5010)), "method": "GET"})  # nor GETs
        counts.append(guard.recent_clients)
        await asyncio.sleep(0.3)  # the others go quiet; the first client goes on
        await call(guard, http_scope(client=("127.0.0.1", 5000)))
        counts.append(guard.recent_clients)
        return counts

    assert asyncio.run(main()) == [1, 3, 1]


@pytest.fixture
def worker_one(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """This process poses as worker 1 of 2 under `bentoml serve`, with its counts file in a temporary folder."""
    import tempfile

    monkeypatch.setattr(bentoml.server_context, "worker_index", 1)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)


async def answer_ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]})
    await send({"type": "http.response.body", "body": b"ok"})


def client(port: int) -> dict:
    return http_scope(client=("127.0.0.1", 6000 + port))


async def crowd(balancer: ConnectionBalancer, connections: int, there: int) -> None:
    """``connections`` keep-alive connections arrive here (worker 2 reports plenty meanwhile, so all are kept),
    then worker 2 turns out to hold ``there``."""
    balancer.slots = balancer._open_slots(client(0))
    balancer.slots[1] = 2 * connections
    for port in range(connections):
        assert (await call(balancer, client(port)))[1]["connection"] == "keep-alive"
    balancer.slots[1] = there


def test_balancer_keeps_connections_while_this_worker_holds_no_more_than_its_share(worker_one) -> None:
    async def main() -> list[str | None]:
        balancer = ConnectionBalancer(answer_ok, workers=2, spacing_s=0.0)
        closes = []
        for port in range(4):  # connections 1..4 here, none on worker 2: share ceil(n / 2), plus 1 slack
            _, headers, _ = await call(balancer, client(port))
            closes.append(headers.get("connection"))
        assert balancer.slots[0] == 4 and balancer.held == 3 and len(balancer.leaving) == 1
        balancer.slots[1] = 8  # worker 2 now holds 8: this one is under its share, nothing to shed
        for port in range(3):
            _, headers, _ = await call(balancer, client(port))
            closes.append(headers.get("connection"))
        return closes

    closes = asyncio.run(main())
    assert closes[:3] == ["keep-alive"] * 3  # 3 <= ceil(3 / 2) + 1
    assert closes[3] == "close"  # 4 > ceil(4 / 2) + 1: the client reconnects, maybe to the other worker
    assert closes[4:] == ["keep-alive"] * 3


def test_balancer_sheds_the_whole_excess_in_one_round_counting_the_clients_expected_back(worker_one) -> None:
    async def main() -> ConnectionBalancer:
        balancer = ConnectionBalancer(answer_ok, workers=2, spacing_s=0.0)
        await crowd(balancer, 30, there=2)  # 30 here, 2 there
        for port in range(30):  # the next request on each connection
            await call(balancer, client(port))
        return balancer

    balancer = asyncio.run(main())
    # Half of the closed clients are expected back: keeping 4 and closing 26 leaves 4 + 13 here, 2 + 13 there.
    # (Shedding only the excess, 13, would leave 17 + 6.5 here on average and take round after round.)
    assert balancer.closed == 26 and balancer.held == 4
    assert balancer.slots[0] == 30  # closed connections still count in the total until their clients are back
    asyncio.run(call(balancer, client(100)))  # a new client here: most likely one of them, back, not one more
    assert balancer.slots[0] == 30


def test_balancer_spaces_the_closes_and_counts_a_queued_one_until_it_goes_out(worker_one) -> None:
    sent_at: list[float] = []

    async def main() -> None:
        gate, held = asyncio.Event(), set()

        async def slow_app(scope, receive, send) -> None:
            if scope["client"] in held:
                await gate.wait()
            await answer_ok(scope, receive, send)

        balancer = ConnectionBalancer(slow_app, workers=2, spacing_s=0.05, leave_s=0.0)
        await crowd(balancer, 10, there=0)

        async def timed(port: int) -> str:
            _, headers, _ = await call(balancer, client(port))
            sent_at.append(time.monotonic())
            return headers["connection"]

        held.add(("127.0.0.1", 6009))
        queued = asyncio.create_task(timed(9))  # its answer waits (a forward queue): counted, not pruned
        await asyncio.sleep(0.01)
        assert balancer.leaving == {("127.0.0.1", 6009): math.inf}
        answers = await asyncio.gather(*(timed(port) for port in range(3)))
        assert answers == ["close"] * 3
        balancer.next_prune = 0.0
        await call(balancer, client(5))  # prunes: the three sent closes are gone (leave_s 0), the queued one stays
        assert ("127.0.0.1", 6009) in balancer.leaving
        assert not {("127.0.0.1", 6000 + port) for port in range(3)} & set(balancer.leaving)
        gate.set()
        assert await queued == "close"

    asyncio.run(main())
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:], strict=False)]
    assert len(gaps) == 3 and min(gaps) >= 0.045  # one close per spacing_s: reconnects do not come as one burst


def test_settings_parse_once_with_one_clear_error() -> None:
    s = Settings.from_env({"SVERTKA_MODELS": "a, b:v1,a", "SVERTKA_WORKERS": "2", "SVERTKA_DEVICE": "cpu"})
    assert s.models == ("a:latest", "b:v1") and s.workers == 2 and s.max_in_flight == 64
    for env, words in [
        ({"SVERTKA_WORKERS": "two"}, "SVERTKA_WORKERS='two' is not an integer"),
        ({"SVERTKA_MAX_IN_FLIGHT": "0"}, "SVERTKA_MAX_IN_FLIGHT=0 must be at least 1"),
        ({"SVERTKA_MODELS": " , "}, "SVERTKA_MODELS names no model"),
    ]:
        with pytest.raises(SettingsError, match=words):
            Settings.from_env({**env, "SVERTKA_DEVICE": "cpu"})


def test_balancer_leaves_clients_that_reconnect_for_every_request_alone_and_caps_the_wait(worker_one) -> None:
    async def churn() -> ConnectionBalancer:
        balancer = ConnectionBalancer(answer_ok, workers=2, spacing_s=0.0)
        for port in range(300):  # every request on a new connection, all on this worker: a close would move nothing
            await call(balancer, client(port))
        return balancer

    balancer = asyncio.run(churn())
    assert balancer.reuse < 0.1 and balancer.closed < 100  # closes stopped once most requests came on new connections
    closed = balancer.closed
    asyncio.run(call(balancer, client(1000)))
    assert balancer.closed == closed

    async def burst() -> list[str]:  # 6 closes due at once, 50 ms apart, none to wait more than 0.12 s: 3 go out
        balancer = ConnectionBalancer(answer_ok, workers=2, spacing_s=0.05, max_wait_s=0.12)
        await crowd(balancer, 12, there=0)
        answers = await asyncio.gather(*(call(balancer, client(port)) for port in range(6)))
        assert balancer.closed == 3 and len(balancer.leaving) == 3
        return [headers["connection"] for _, headers, _ in answers]

    assert sorted(asyncio.run(burst())) == ["close"] * 3 + ["keep-alive"] * 3


def test_balancer_forgets_a_single_use_connection_once_answered(worker_one) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def app(scope, receive, send) -> None:
            if scope["client"][1] == 6000:
                await gate.wait()  # this one waits for its answer (a forward queue)
            await answer_ok(scope, receive, send)

        balancer = ConnectionBalancer(app, workers=2, once_s=0.05)
        waiting = asyncio.create_task(call(balancer, client(0)))
        await asyncio.sleep(0.1)
        for port in range(1, 50):  # each on a new connection, answered at once, never used again
            await call(balancer, client(port))
            await asyncio.sleep(0.002)
        assert 2 <= balancer.held <= 30  # the one still waiting for its answer, and the last 50 ms' worth
        assert ("127.0.0.1", 6000) in balancer.once
        gate.set()
        await waiting
        await call(balancer, client(0))  # its next request, right after the answer: the same connection, reused
        assert ("127.0.0.1", 6000) in balancer.last_seen
        await asyncio.sleep(0.1)
        await call(balancer, client(100))
        assert balancer.held == 2  # connection 0 (used twice) and the newest

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_strict_multipart_hands_the_upload_in_memory_and_validates_the_rest() -> None:
    """The API gets the uploaded bytes as an ``Upload`` (no temporary file); text fields are validated as before."""
    from starlette.testclient import TestClient

    from serving.guards import Upload, strict_multipart

    @bentoml.service(name="echo_upload")
    class Echo:
        @strict_multipart
        @bentoml.api(route="/echo")
        async def echo(self, image: Path, top_k: int | None = None) -> dict:
            return {"kind": type(image).__name__, "name": image.name, "size": len(image.read_bytes()), "top_k": top_k}

    data = bytes(range(256)) * 5
    with TestClient(Echo.to_asgi()) as client:
        r = client.post("/echo", files={"image": ("../../etc/x.png", data)}, data={"top_k": "3"})
        assert r.status_code == 200, r.text
        assert r.json() == {"kind": Upload.__name__, "name": "x.png", "size": len(data), "top_k": 3}
        r = client.post("/echo", files={"image": ("a.png", data)}, data={"top_k": "three"})
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["top_k"]
        r = client.post("/echo", data={"top_k": "3"}, files={"other": ("a.png", data)})
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["other"]  # a file where text belongs
        r = client.post("/echo", files={"top_k": (None, "2")})
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["image"]  # no file at all
    assert Upload.of("", b"ab").read_bytes() == b"ab" and Upload.of("", b"").name == "upload"
