"""HTTP guards in front of the service's APIs, each refusal a JSON ``{"error": reason}``: 401, 413, 503, the 400
of a malformed form, and the routers' 404 and 405 (docs/SERVING.md, "Bad input", "Security").

    Svertka.add_asgi_middleware(AdmissionMiddleware, max_in_flight=64)     # likewise the other middlewares
    @strict_multipart                                                       # on a @bentoml.api method
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic_core import PydanticCustomError, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth import Tokens

# The health endpoints: never refused (probes must see a busy worker) and open without a token.
OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every refusal: ``{"error": reason}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON answer (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        reason = f"request body is over the limit of {self.max_bytes} bytes (SVERTKA_MAX_BODY_BYTES)"
        headers = dict(scope.get("headers") or [])
        if (length := headers.get(b"content-length", b"")).isdigit():
            if int(length) > self.max_bytes:
                return await error(413, reason)(scope, receive, send)
            if b"transfer-encoding" not in headers:
                # The server (h11, httptools) never delivers more body than Content-Length declares: nothing to count.
                return await self.app(scope, receive, send)
        seen, too_big, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_big:
                return  # whatever the app says about a cut-off body is replaced by the 413
            started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if too_big and not started:
            await error(413, reason)(scope, receive, send)


PROMPT_PAGE = (Path(__file__).parent / "static" / "token.html").read_bytes()  # asks a browser for the token


class TokenAuthMiddleware:
    """401 for every request without an accepted ``Authorization: Bearer`` token (``serving.auth``), but the health
    paths (``tokens`` None: no token configured, everything passes); a browser at ``/`` gets a page that asks for it."""

    def __init__(self, app: ASGIApp, tokens: Tokens | None) -> None:
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tokens is None or scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "http" and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            return await self.app(scope, receive, send)  # a CORS preflight: browsers never send credentials
        header = headers.get(b"authorization")
        scheme, _, token = (header or b"").strip().partition(b" ")
        given = scheme.lower() == b"bearer"  # whether it carried a token at all
        if header is None:
            reason = "missing API token: send the header 'Authorization: Bearer <token>'"
        elif not given:
            reason = "the Authorization header must be 'Bearer <token>'"
        elif not token.strip():
            reason = "empty API token in 'Authorization: Bearer'"
        elif not self.tokens.accepts(token.strip()):
            reason = "invalid API token"
        else:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        challenge = 'Bearer realm="svertka"' + (', error="invalid_token"' if given else "")
        answer = {"WWW-Authenticate": challenge, "Cache-Control": "no-store"}
        browser = (
            scope["method"] in ("GET", "HEAD") and scope["path"] == "/" and b"text/html" in headers.get(b"accept", b"")
        )
        response = HTMLResponse(PROMPT_PAGE, 401, answer) if browser else error(401, reason, answer)
        if scope["method"] == "HEAD":
            response.body = b""  # the headers of a GET (its Content-Length too), no body
        await response(scope, receive, send)


class JsonRoutingErrors:
    """The routers' plain-text 404 (naming ``endpoints``) and 405 (keeping ``Allow``) as ``{"error": reason}``;
    any other answer, JSON 404s of the service included, passes through untouched."""

    def __init__(self, app: ASGIApp, endpoints: str) -> None:
        self.app, self.endpoints = app, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replacement: JSONResponse | None = None

        async def json_send(message: Message) -> None:
            nonlocal replacement
            if replacement is not None:  # the plain body being replaced: drop it, answer once it ends
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    await replacement(scope, receive, send)
                return
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    what, allow = f"{scope.get('method', '?')} {scope.get('path', '?')}", headers.get(b"allow", b"")
                    if message["status"] == 405:
                        why = f"{what}: method not allowed here; use {allow.decode('latin-1')}"
                        replacement = error(405, why, {"Allow": allow.decode("latin-1")} if allow else None)
                    else:
                        replacement = error(404, f"{what}: no such endpoint; the API: {self.endpoints}")
                    return
            await send(message)

        await self.app(scope, receive, json_send)


class AdmissionMiddleware:
    """At most ``max_in_flight`` requests at once in this worker, past it a 503 with ``Retry-After`` before anything
    parses the body. The home of the worker's ``load()``: requests in flight, and ``recent_clients``, connections
    that called an API (POST) more than once, the last time within ``window_s`` (why: docs/SERVING.md)."""

    current: AdmissionMiddleware | None = None  # the one built last in this process (one per worker)
    retry_after = {"Retry-After": "1"}
    drain_bytes = 32 << 20

    def __init__(self, app: ASGIApp, max_in_flight: int, window_s: float = 1.0) -> None:
        self.app, self.max_in_flight, self.window_s = app, max_in_flight, window_s
        self.in_flight = self.refused = self.recent_clients = 0
        self.seen: dict[Any, list] = {}  # client (host, port) -> [when its last request came, requests]
        self.next_prune = 0.0
        AdmissionMiddleware.current = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        now = time.monotonic()
        if scope["method"] == "POST":  # the APIs; not the page, /models or /stats
            entry = self.seen.setdefault(scope.get("client"), [now, 0])
            entry[0], entry[1] = now, entry[1] + 1
            if entry[1] == 2:  # a connection that stays: a client
                self.recent_clients += 1
        if now >= self.next_prune:
            self.seen = {k: v for k, v in self.seen.items() if v[0] >= now - self.window_s}
            self.recent_clients = sum(1 for v in self.seen.values() if v[1] > 1)
            self.next_prune = now + self.window_s / 4
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            reason = (
                f"server busy: this worker already holds {self.in_flight} requests (SVERTKA_MAX_IN_FLIGHT); retry later"
            )
            # Read and drop the body (up to drain_bytes), or the server resets the connection and no 503 arrives.
            seen = 0
            while seen <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
                seen += len(message.get("body", b""))
            return await error(503, reason, self.retry_after)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def load() -> int:
    """How busy this worker is: requests in flight or, if more, recent keep-alive clients (0 without admission)."""
    admission = AdmissionMiddleware.current
    return max(admission.in_flight, admission.recent_clients) if admission is not None else 0


class Upload(PurePosixPath):
    """An upload in memory, in place of a temporary file's ``Path``: ``read_bytes()`` and ``name`` (the client's
    file name; nothing on the file system has it)."""

    data: bytes

    @classmethod
    def of(cls, filename: str, data: bytes) -> Upload:
        upload = cls(PurePosixPath(filename).name or "upload")
        upload.data = data
        return upload

    def read_bytes(self) -> bytes:
        return self.data


def _form_error(field: str, message: str) -> Exception:
    """A pydantic ValidationError: BentoML answers it with 400 ``{"error": ..., "detail": [{"loc", "msg"}]}``."""
    return ValidationError.from_exception_data(
        "Input", [{"type": PydanticCustomError("bad_form", message), "loc": (field,), "input": None}]
    )


def strict_multipart(api: Any) -> Any:
    """Make a ``@bentoml.api`` method accept only a well-formed multipart form (else a 400, not BentoML's 500 or
    its fetch of a URL given in a file field); a ``Path`` input arrives as an ``Upload``."""
    base = api.input_spec

    async def from_http_request(cls: type, request: Request, serde: Any) -> Any:
        if not cls.model_fields:  # no inputs (POST /models): ignore whatever body came
            return cls()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            got = ctype or "no Content-Type"
            raise _form_error("body", f"send multipart/form-data with an 'image' file part, got {got}")
        try:
            form = await request.form()
        except Exception as e:  # starlette's MultiPartException / HTTPException
            raise _form_error("body", f"malformed multipart/form-data body ({getattr(e, 'detail', e)})") from None
        for key, value in form.multi_items():
            is_file = not isinstance(value, str)
            if key in cls.multipart_fields and not is_file:
                raise _form_error(key, f"'{key}' must be a file part (curl -F {key}=@FILE), not text")
            if key not in cls.multipart_fields and is_file:
                raise _form_error(key, f"'{key}' must be a text field, not a file")
        # BentoML would copy each upload into a temporary file (0.6-0.9 ms of CPU): validate a path, hand bytes.
        data: dict[str, Any] = {}
        uploads: dict[str, Upload] = {}
        for key in form:
            if key in cls.multipart_fields:
                file = form.getlist(key)[0]  # a second part of the same name is ignored, as BentoML does
                uploads[key] = Upload.of(file.filename or "upload", file.file.read())
                data[key] = PurePosixPath(uploads[key])
            else:
                try:  # as BentoML parses a text field: JSON if it is JSON, else the string
                    data[key] = json.loads(form[key])
                except (ValueError, RecursionError):
                    data[key] = form[key]
        parsed = cls.model_validate(data)  # pydantic.ValidationError: BentoML answers 400 with the details
        for key, upload in uploads.items():
            setattr(parsed, key, upload)
        return parsed

    # BentoML 1.4.40 has no public hook for request parsing (URLs in file fields: bentoml/BentoML#4411).
    api.input_spec = type(base.__name__, (base,), {"from_http_request": classmethod(from_http_request)})
    return api
