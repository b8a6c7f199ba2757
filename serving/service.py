"""BentoML service: classify images and estimate ages with the bundles in BentoML's model store (the endpoints,
their errors, how it runs and why, with measurements: docs/SERVING.md).

    SVERTKA_MODELS=fashion_mnist_cnn:latest,utkface_age:latest bentoml serve      # at the repo root
    curl -F image=@shirt.png -F top_k=3 localhost:3000/classify     # also /estimate_age, /models, /stats; the page: /
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from data.preprocess import ImageError
from serving import auth, guards
from serving.guards import AdmissionMiddleware, BodyLimitMiddleware, JsonRoutingErrors, error, load, strict_multipart
from serving.predictor import Predictor, Prepared
from serving.settings import Settings, cpu_count

SETTINGS = Settings.from_env()  # SettingsError: one line from `bentoml serve`, exit status 1
if bentoml.server_context.worker_index is None:  # `bentoml serve`; each worker's Predictors check their bundles
    SETTINGS.check_models()
MAX_FACES = 100  # the most faces /estimate_age answers for (max_faces: 1..MAX_FACES)
INLINE_PIXELS = 256 * 256  # images up to this many pixels (from the header) decode on the event loop
INLINE_FORWARD_MS = 2.0  # forwards expected to take at most this run on the event loop when the worker is idle
FULL_GC_S = 300  # seconds between full garbage collections (docs/SERVING.md, "Garbage collection")


def full_collections_every(seconds: float) -> threading.Event:
    """Python's full collections every ``seconds`` from a thread (docs/SERVING.md); set the event to stop."""
    gc.set_threshold(*gc.get_threshold()[:2], 1_000_000_000)  # generation 2 only when collected by hand
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(seconds):
            gc.collect()

    threading.Thread(target=run, name="full-gc", daemon=True).start()
    return stop


class Batcher:
    """Batches of single inputs for ``fn`` (one FIFO queue, one forward thread), each caller getting its row. A
    forward expected within ``inline_ms`` runs on the event loop when the worker holds no more than the batch
    (``load``); a lone client's slow forward runs at ``solo`` threads, others at ``threads`` (docs/SERVING.md)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        max_batch_size: int,
        wait_ms: int,
        max_queue: int = 1024,
        inline_ms: float = 0.0,
        load: Callable[[], int] = lambda: 0,
        threads: int | None = None,
        solo: int | None = None,
    ) -> None:
        self.fn, self.max_batch_size, self.wait_s, self.max_queue = fn, max_batch_size, wait_ms / 1000, max_queue
        self.inline_s, self.load = inline_ms / 1000, load
        self.threads = threads or torch.get_num_threads()
        self.solo = solo or self.threads
        self.item_s = math.inf  # forward seconds per input, measured (a moving average); unknown at first
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None  # held here: the event loop keeps only a weak reference
        self.batches = self.items = self.inline = 0
        self.running = False  # a batch is being collected or computed by _run

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, h, w)`` -> this input's row of ``fn``'s ``(B, ...)`` output."""
        if self.queue is None:  # created lazily: needs the server's running event loop
            self.queue = asyncio.Queue(self.max_queue)
            self.task = asyncio.get_running_loop().create_task(self._run())
        if not self.running and self.queue.empty() and self.item_s <= self.inline_s and self.load() <= 1:
            # Alone, and the forward is cheap: run it right here (no queue, no wake-up of the batcher task).
            self.batches, self.items, self.inline = self.batches + 1, self.items + 1, self.inline + 1
            return self._timed(x[None])[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            self.running = True
            await asyncio.sleep(0)  # let requests that are ready right now join
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch_size:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [(x, f) for x, f in items if not f.cancelled()]  # clients that went away
            if not items:
                self.running = False
                continue
            self.batches, self.items = self.batches + 1, self.items + len(items)
            try:
                batch = torch.stack([x for x, _ in items])  # (B, C, h, w)
                if self.item_s * len(batch) <= self.inline_s and self.load() <= len(batch):
                    self.inline += 1
                    out = self._timed(batch)
                else:
                    out = await loop.run_in_executor(self.executor, self._timed, batch)
            except Exception as e:  # a bug, not bad input: every caller gets it (a 500)
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self.running = False
            for (_, f), row in zip(items, out, strict=True):
                if not f.done():
                    f.set_result(row)

    def _timed(self, batch: torch.Tensor) -> torch.Tensor:
        """``fn(batch)`` at the thread count for the load, its time per input folded into ``item_s`` (never twice
        at once: ``submit``'s fast path only while ``_run`` is idle)."""
        solo = len(batch) == 1 and self.item_s > self.inline_s and self.load() <= 1
        want = self.solo if solo else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        t0 = time.perf_counter()
        out = self.fn(batch)
        per_item = (time.perf_counter() - t0) / len(batch)
        self.item_s = per_item if self.item_s == math.inf else 0.8 * self.item_s + 0.2 * per_item
        return out


async def _get_models(request: Request) -> JSONResponse:
    return JSONResponse({"models": bentoml.get_current_service().models_info})


async def _get_stats(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().stats())


def content_security_policy(html: str) -> str:
    """A CSP that lets run only the page's own inline ``<script>`` and ``<style>`` (by hash), fetch only this origin."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")  # inline CSS and JS, no build
PAGE_HEADERS = {
    "Content-Security-Policy": content_security_policy(PAGE),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _get_page(request: Request) -> Response:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


async def _get_openapi_docs(request: Request) -> Response:  # BentoML's OpenAPI page, which BentoML serves at /
    import _bentoml_impl.server

    return FileResponse(Path(_bentoml_impl.server.__file__).parent / "main-openapi.html")


# GET routes beside the APIs (BentoML's API routes are POST only): the page at /, OpenAPI at /docs.
GET_ROUTES = {"/models": _get_models, "/stats": _get_stats, "/": _get_page, "/docs": _get_openapi_docs}
info_app = Starlette(routes=[Route(path, fn) for path, fn in GET_ROUTES.items()])


# Model references at class scope, so `bentoml build` packs them: BentoML 1.4 finds them among the class's
# attributes (inherited ones too), not inside a dict, so each is an attribute of its own of this base class.
BENTO_MODELS = {tag: bentoml.models.BentoModel(tag) for tag in SETTINGS.models}  # configured tag -> reference
ModelReferences = type("ModelReferences", (), {f"model_{i}": ref for i, ref in enumerate(BENTO_MODELS.values())})


@bentoml.service(
    name="svertka",
    workers=SETTINGS.workers,
    traffic={"timeout": 60},
    # Off by default, each costs every request CPU; BentoML's own config turns them on (docs/SERVING.md).
    # Tracing: every URL excluded, the documented off switch of the middleware BentoML always installs.
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
    tracing={"excluded_urls": ".*"},
    envs=[{"name": "SVERTKA_MODELS", "value": ",".join(SETTINGS.models)}],
)
@bentoml.asgi_app(info_app, path="/")
class Svertka(ModelReferences):
    """Image classification and age estimation over the models named by ``SVERTKA_MODELS``."""

    bento_models = BENTO_MODELS

    def __init__(self) -> None:
        torch.set_num_threads(SETTINGS.torch_threads)  # one worker per core: workers must not fight over cores
        self.predictors: dict[str, Predictor] = {}  # full tag 'name:version' -> predictor
        self.aliases: dict[str, str] = {}  # 'name', 'name:latest', 'name:version' -> full tag
        self.batchers: dict[str, Batcher] = {}
        self.models_info: list[dict[str, Any]] = []  # what GET /models shows: fixed here, at start
        self.decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        s = SETTINGS
        solo = min(cpu_count(), s.workers * s.torch_threads)  # a lone request of a lone client: every thread
        for configured, ref in self.bento_models.items():
            stored = ref.resolve()  # 'name:latest' -> the version in the store now, once
            full = str(stored.tag)
            pred = Predictor(stored.path, s.device, s.max_pixels, runtime=s.runtime)
            pred.warm_up(s.max_batch_size)
            self.predictors[full] = pred
            if pred.onnx is not None:  # ONNX Runtime: one session per thread count, the lone requests' one now too
                pred.onnx.session(solo)
            self.batchers[full] = Batcher(
                pred.predict_tensors, s.max_batch_size, s.batch_wait_ms, s.max_in_flight, INLINE_FORWARD_MS, load,
                threads=s.torch_threads, solo=solo,
            )  # fmt: skip
            for alias in (configured, full, full.split(":")[0]):
                self.aliases.setdefault(alias, full)
            info = {"tag": full, "configured_as": configured, **pred.info()}
            info["input"]["max_body_bytes"] = s.max_body_bytes
            self.models_info.append(info)
        # What is loaded now lives as long as the worker: out of the collector's sight (docs/SERVING.md).
        gc.collect()
        gc.freeze()
        full_collections_every(FULL_GC_S)

    def stats(self) -> dict[str, Any]:
        """This worker's counters: forward batches, requests in flight, clients seen in the last second, 503s."""
        batches = sum(b.batches for b in self.batchers.values())
        items = sum(b.items for b in self.batchers.values())
        return {
            "pid": os.getpid(),
            "batches": batches,
            "batched_requests": items,
            "mean_batch_size": items / batches if batches else None,
            "inline_batches": sum(b.inline for b in self.batchers.values()),
            **{k: getattr(AdmissionMiddleware.current, k, None) for k in ("in_flight", "recent_clients", "refused")},
            "max_in_flight": SETTINGS.max_in_flight,
        }

    def _pick(self, name: str | None, task: str) -> tuple[str, Predictor] | JSONResponse:
        """The model a request asked for (or the first of ``task``), or a 4xx answer saying why not."""
        served = [t for t, p in self.predictors.items() if p.task == task]
        if name is None or not str(name).strip():
            if not served:
                return error(404, f"no {task} model is served (SVERTKA_MODELS={','.join(SETTINGS.models)})")
            return served[0], self.predictors[served[0]]
        full = self.aliases.get(str(name).strip())
        if full is None:
            return error(400, f"unknown model {name!r}; served models: {', '.join(self.predictors)}")
        if (pred := self.predictors[full]).task != task:
            return error(400, f"model {full!r} is a {pred.task} model; {task} models: {', '.join(served)}")
        return full, pred

    async def _inputs(
        self, pred: Predictor, image: Path, max_faces: int | None = None, detect: bool = False
    ) -> Prepared | JSONResponse:
        """The upload's inputs or a 400: small images (by the header) decode here, large ones and faces in a thread."""
        try:
            img = pred.loader.open(image.read_bytes())
            if not (pred.uses_faces and detect) and img.width * img.height <= INLINE_PIXELS:
                return pred.prepare(img, max_faces, detect)
            return await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, pred.prepare, img, max_faces, detect
            )
        except ImageError as e:
            return error(400, str(e))

    # The APIs return their JSON as a starlette Response: BentoML passes it through as is, which skips
    # its generic output path (a JSON-schema build per response) and keeps `-> dict` for the OpenAPI docs.
    @strict_multipart
    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int | None = None, model: str | None = None) -> dict[str, Any]:
        """Classify one image: ``{"label", "score", "top_k": [{"label", "score"}, ...], "model"}`` (top_k: 5)."""
        if isinstance(picked := self._pick(model, "classification"), JSONResponse):
            return picked
        tag, pred = picked
        top_k = min(5, pred.num_classes) if top_k is None else top_k
        if not 1 <= top_k <= pred.num_classes:
            return error(400, f"top_k must be between 1 and {pred.num_classes} for model {tag!r}, got {top_k}")
        if isinstance(prep := await self._inputs(pred, image), JSONResponse):
            return prep
        out = await self.batchers[tag].submit(prep.inputs[0])  # (C, h, w) -> (N,)
        return JSONResponse({**pred.format(out, top_k), "model": tag})

    @strict_multipart
    @bentoml.api(route="/estimate_age")
    async def estimate_age(
        self, image: Path, model: str | None = None, max_faces: int | None = None, detect: bool = True
    ) -> dict[str, Any]:
        """Ages of the faces in a photo, largest first: ``{"faces": [{"box", "score", "age"}, ...], "model"}``
        (``detect=false``: the image is an aligned chip, one face, score null)."""
        if isinstance(picked := self._pick(model, "regression"), JSONResponse):
            return picked
        tag, pred = picked
        if max_faces is not None and not 1 <= max_faces <= MAX_FACES:
            return error(400, f"max_faces must be between 1 and {MAX_FACES}, got {max_faces}")
        if isinstance(prep := await self._inputs(pred, image, max_faces or MAX_FACES, detect), JSONResponse):
            return prep
        outs = await asyncio.gather(*(self.batchers[tag].submit(x) for x in prep.inputs))
        results = pred.face_results(prep, torch.stack(outs) if outs else torch.zeros(0))
        faces = [{"box": r["box"], "score": r["score"], "age": r[pred.target_name]} for r in results]
        return JSONResponse({"faces": faces, "model": tag})

    @strict_multipart
    @bentoml.api(route="/models")
    async def models(self) -> dict[str, Any]:
        """The same as ``GET /models``, for BentoML clients (which POST)."""
        return JSONResponse({"models": self.models_info})


# Outermost first: refuse a missing token and overload before anything reads the body, then the body limit.
TOKENS = auth.startup()
if TOKENS is not None:  # no token configured: no layer at all (each costs every request a little)
    Svertka.add_asgi_middleware(guards.TokenAuthMiddleware, tokens=TOKENS)
Svertka.add_asgi_middleware(AdmissionMiddleware, max_in_flight=SETTINGS.max_in_flight)
Svertka.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes)
# What a 404 names: the APIs (POST), the GET routes of info_app (the page at /, OpenAPI at /docs), the probe.
ENDPOINTS = [f"POST {api.route}" for api in Svertka.apis.values()] + [f"GET {r.path}" for r in info_app.routes]
Svertka.add_asgi_middleware(JsonRoutingErrors, endpoints=", ".join([*ENDPOINTS, "GET /readyz"]))

__all__ = ["Svertka", "Batcher", "SETTINGS"]
