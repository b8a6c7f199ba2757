"""The HTTP guards as ASGI middleware, in process (the real server: test_serving.py).

pytest tests/test_guards.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import bentoml
import pytest

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
    from serving.guards import load

    assert load() == 1  # the worker's load: the last admission built, one client left, nothing in flight


def test_removed_settings_say_what_to_use_instead(capsys: pytest.CaptureFixture[str]) -> None:
    Settings.from_env({"SVERTKA_DEVICE": "cpu", "SVERTKA_ACCESS_LOG": "1", "SVERTKA_BALANCE": "0"})
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: SVERTKA_ACCESS_LOG is no longer read: set "
        "BENTOML_CONFIG_OPTIONS=services.svertka.logging.access.enabled=true",
        "warning: SVERTKA_BALANCE is no longer read: it is gone (docs/SERVING.md, 'Measuring it')",
    ]


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
