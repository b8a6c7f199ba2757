"""The page at ``/``: try every served model in a browser (``serving/static/index.html``, no build step).

    SVERTKA_MODELS=quickstart:latest,utkface_age:latest bentoml serve     # then open http://localhost:3000/

One self-contained HTML file (inline CSS and JavaScript, no external assets) that calls the same
APIs as any client: ``GET /models``, ``POST /classify``, ``POST /estimate_age``. It is sent with a
Content-Security-Policy that lets only its own inline script and style run and only this origin
be fetched. BentoML's OpenAPI page, which ``/`` used to show, moves to ``/docs``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"


def content_security_policy(html: str) -> str:
    """A CSP that lets run only the page's own inline ``<script>`` and ``<style>`` (by hash), fetch only this origin."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


PAGE = (STATIC / "index.html").read_text(encoding="utf-8")
PAGE_HEADERS = {
    "Content-Security-Policy": content_security_policy(PAGE),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    """``GET /``: the page."""
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


async def openapi_docs(request: Request) -> Response:
    """``GET /docs``: BentoML's OpenAPI (Swagger) page, which BentoML itself serves at ``/``."""
    import _bentoml_impl.server

    return FileResponse(Path(_bentoml_impl.server.__file__).parent / "main-openapi.html")


routes = [Route("/", index, methods=["GET"]), Route("/docs", openapi_docs, methods=["GET"])]
