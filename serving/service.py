"""BentoML service: classify images and estimate ages with the bundles in BentoML's model store.

    SVERTKA_MODELS=fashion_mnist_cnn:latest,utkface_age:latest bentoml serve      # at the repo root
    curl -F image=@shirt.png -F top_k=3 localhost:3000/classify
    curl -F image=@face.jpg localhost:3000/estimate_age
    curl localhost:3000/models

The service is thin: every model is a ``serving.predictor.Predictor`` (the batch script uses the
same class). Uploads are decoded (small ones on the event loop, large ones in a thread pool)
and queued per model; a small batcher runs the forward pass in its own thread on whatever has
queued up (up to ``SVERTKA_MAX_BATCH_SIZE``, waiting at most
``SVERTKA_BATCH_WAIT_MS`` for more), so concurrent requests share one batched forward. Bad
input gets a 4xx JSON ``{"error": ...}``, never a 500. Settings (environment variables):

    SVERTKA_MODELS          comma-separated BentoML model tags       (quickstart:latest)
    SVERTKA_WORKERS         worker processes                         (CPU count, 1 with a GPU)
    SVERTKA_TORCH_THREADS   torch threads per worker                 (CPU count / workers)
    SVERTKA_MAX_BATCH_SIZE  largest forward batch                    (32)
    SVERTKA_BATCH_WAIT_MS   how long a batch waits for more requests (0: take what is queued)
    SVERTKA_MAX_BODY_BYTES  largest request body                     (20 MiB)
    SVERTKA_MAX_PIXELS      largest image (width x height), checked before decoding (40 M)
    SVERTKA_DEVICE          cpu, cuda, cuda:1, ...                   (cuda when available)
    SVERTKA_ACCESS_LOG      1: log every request                     (0)
    SVERTKA_METRICS         1: Prometheus metrics at /metrics        (0)
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio.to_thread
import bentoml
import torch
from _bentoml_sdk.io_models import IODescriptor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from data.preprocess import DEFAULT_MAX_PIXELS, ImageError
from serving.predictor import Predictor

DEFAULT_MODELS = "quickstart:latest"


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"error: {name}={raw!r} is not an integer")
    if value < minimum:
        sys.exit(f"error: {name}={value} must be at least {minimum}")
    return value


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configured_tags() -> list[str]:
    """The tags in ``SVERTKA_MODELS`` (``name`` alone means ``name:latest``), in order, without repeats."""
    raw = os.environ.get("SVERTKA_MODELS", "").strip() or DEFAULT_MODELS
    tags = [t.strip() if ":" in t else f"{t.strip()}:latest" for t in raw.split(",") if t.strip()]
    return list(dict.fromkeys(tags))


def check_models(tags: list[str]) -> None:
    """Stop with one clear line when a configured model is not in the store (before any worker starts)."""
    from bentoml.exceptions import BentoMLException

    from models.bundle import read_meta
    from models.faces import FaceStageError, check_available
    from models.store import bundle_dir_for_tag

    for tag in tags:
        try:
            folder = bundle_dir_for_tag(tag)
        except (BentoMLException, ValueError) as e:
            sys.exit(
                f"error: SVERTKA_MODELS names {tag!r}: {e}. Save a bundle there with "
                "`python -m training.export --ckpt CKPT --out DIR --bentoml NAME` or set SVERTKA_MODELS."
            )
        try:
            if read_meta(folder).faces:  # a model of aligned face chips: the face stage must be here
                check_available(folder)
        except FaceStageError as e:
            sys.exit(f"error: SVERTKA_MODELS names {tag!r}, whose model needs face detection: {e}")


MODEL_TAGS = configured_tags()
check_models(MODEL_TAGS)
USE_GPU = torch.cuda.is_available() and os.environ.get("SVERTKA_DEVICE", "auto") != "cpu"
WORKERS = _env_int("SVERTKA_WORKERS", 1 if USE_GPU else _cpu_count(), minimum=1)
TORCH_THREADS = _env_int("SVERTKA_TORCH_THREADS", max(1, _cpu_count() // WORKERS), minimum=1)
MAX_BATCH_SIZE = _env_int("SVERTKA_MAX_BATCH_SIZE", 32, minimum=1)
BATCH_WAIT_MS = _env_int("SVERTKA_BATCH_WAIT_MS", 0)
MAX_BODY_BYTES = _env_int("SVERTKA_MAX_BODY_BYTES", 20 * 1024 * 1024, minimum=1)
MAX_PIXELS = _env_int("SVERTKA_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1)
# BentoML's per-request access log line and Prometheus metrics cost ~1 ms of CPU per request,
# 20% of a small model's whole cost: off unless asked for.
ACCESS_LOG = _env_int("SVERTKA_ACCESS_LOG", 0) > 0
METRICS = _env_int("SVERTKA_METRICS", 0) > 0


MAX_FACES = 100  # the most faces /estimate_age answers for (max_faces: 1..MAX_FACES)
INLINE_DECODE_BYTES = 256 * 1024
DECODE_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")


# The APIs return their JSON as a starlette Response: BentoML passes it through as is, which skips
# its generic output path (a JSON-schema build per response) and keeps `-> dict` for the OpenAPI docs.
def error(status: int, message: str) -> JSONResponse:
    """The one shape of every 4xx answer: ``{"error": reason}``."""
    return JSONResponse({"error": message}, status_code=status)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON answer (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        reason = f"request body is over the limit of {self.max_bytes} bytes (SVERTKA_MAX_BODY_BYTES)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error(413, reason)(scope, receive, send)
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


def _form_error(field: str, message: str) -> Exception:
    """A pydantic ValidationError: BentoML answers it with 400 ``{"error": ..., "detail": [{"loc", "msg"}]}``."""
    from pydantic_core import PydanticCustomError, ValidationError

    return ValidationError.from_exception_data(
        "Input", [{"type": PydanticCustomError("bad_form", message), "loc": (field,), "input": None}]
    )


def strict_form(spec: type[IODescriptor]) -> type[IODescriptor]:
    """``spec`` that accepts only a well-formed multipart form: a 400, not a 500, for anything else.

    BentoML alone would fetch a URL given as text in a file field, answer 500 to a file part in a
    text field, to a malformed multipart body or to a JSON body with bad syntax.
    """

    async def from_http_request(cls: type[IODescriptor], request: Request, serde: Any) -> IODescriptor:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not cls.model_fields:  # no inputs (POST /models): ignore whatever body came
            return cls()
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
        return await IODescriptor.from_http_request.__func__(cls, request, serde)

    return type(spec.__name__, (spec,), {"from_http_request": classmethod(from_http_request)})


class Batcher:
    """Collect single inputs into batches for ``fn`` (run in one thread), resolve each caller's future."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_batch_size: int, wait_ms: int) -> None:
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_ms / 1000
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None  # held here: the event loop keeps only a weak reference

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, h, w)`` -> this input's row of ``fn``'s ``(B, ...)`` output."""
        if self.queue is None:  # created lazily: needs the server's running event loop
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
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
                continue
            try:
                batch = torch.stack([x for x, _ in items])  # (B, C, h, w)
                out = await loop.run_in_executor(self.executor, self.fn, batch)
            except Exception as e:  # a bug, not bad input: every caller gets it (a 500)
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), row in zip(items, out, strict=True):
                if not f.done():
                    f.set_result(row)


def models_info() -> list[dict[str, Any]]:
    """Every served model: tag, task, classes or target range, input spec, recorded test metrics."""
    from models.bundle import read_meta
    from models.store import bundle_dir_for_tag
    from serving.predictor import describe

    out = []
    for tag in MODEL_TAGS:
        stored = bentoml.models.get(tag)
        meta = read_meta(bundle_dir_for_tag(tag))
        entry: dict[str, Any] = {"tag": str(stored.tag), "configured_as": tag, **describe(meta, MAX_PIXELS)}
        entry["input"]["max_body_bytes"] = MAX_BODY_BYTES
        out.append(entry)
    return out


async def _get_models(request: Request) -> JSONResponse:
    return JSONResponse({"models": await anyio.to_thread.run_sync(models_info)})


# GET /models (BentoML API routes are POST only): a tiny Starlette app mounted beside the APIs.
info_app = Starlette(routes=[Route("/models", _get_models, methods=["GET"])])


class _Svertka:
    """Image classification and age estimation over the models named by ``SVERTKA_MODELS``."""

    def __init__(self) -> None:
        from models.store import bundle_dir_for_tag

        torch.set_num_threads(TORCH_THREADS)  # one worker per core: workers must not fight over cores
        device = os.environ.get("SVERTKA_DEVICE") or None
        self.predictors: dict[str, Predictor] = {}  # full tag 'name:version' -> predictor
        self.aliases: dict[str, str] = {}  # 'name', 'name:latest', 'name:version' -> full tag
        self.batchers: dict[str, Batcher] = {}
        for tag in MODEL_TAGS:
            full = str(bentoml.models.get(tag).tag)
            pred = Predictor(bundle_dir_for_tag(tag), device=device, max_pixels=MAX_PIXELS)
            self.predictors[full] = pred
            self.batchers[full] = Batcher(pred.predict_tensors, MAX_BATCH_SIZE, BATCH_WAIT_MS)
            for alias in (tag, full, full.split(":")[0]):
                self.aliases.setdefault(alias, full)
        # Everything loaded so far (BentoML, torch, pydantic: a million objects) lives as long as the
        # worker: freeze it out of the garbage collector, whose full passes would otherwise stall
        # every in-flight request for hundreds of milliseconds (the p99 under load).
        gc.collect()
        gc.freeze()

    def _pick(self, name: str | None, task: str) -> tuple[str, Predictor] | JSONResponse:
        """The model a request asked for (or the first of ``task``), or a 4xx answer saying why not."""
        served = [t for t, p in self.predictors.items() if p.task == task]
        if name is None or not str(name).strip():
            if not served:
                return error(404, f"no {task} model is served (SVERTKA_MODELS={','.join(MODEL_TAGS)})")
            return served[0], self.predictors[served[0]]
        full = self.aliases.get(str(name).strip())
        if full is None:
            return error(400, f"unknown model {name!r}; served models: {', '.join(self.predictors)}")
        if self.predictors[full].task != task:
            return error(
                400, f"model {full!r} is a {self.predictors[full].task} model; {task} models: {', '.join(served)}"
            )
        return full, self.predictors[full]

    async def _predict(self, tag: str, pred: Predictor, image: Path, top_k: int) -> dict[str, Any] | JSONResponse:
        try:
            if image.stat().st_size <= INLINE_DECODE_BYTES:  # small: decode here, a thread hop costs more
                x = pred.load(image.read_bytes())  # decode + preprocess: (C, h, w)
            else:  # large: decode in a thread so the event loop keeps serving
                x = await asyncio.get_running_loop().run_in_executor(DECODE_POOL, pred.load, image.read_bytes())
        except ImageError as e:
            return error(400, str(e))
        out = await self.batchers[tag].submit(x)
        return {**pred.format(out, top_k), "model": tag}

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int | None = None, model: str | None = None) -> dict[str, Any]:
        """Classify one image: ``{"label", "score", "top_k": [{"label", "score"}, ...], "model"}`` (top_k: 5)."""
        picked = self._pick(model, "classification")
        if isinstance(picked, JSONResponse):
            return picked
        tag, pred = picked
        top_k = min(5, pred.num_classes) if top_k is None else top_k
        if not 1 <= top_k <= pred.num_classes:
            return error(400, f"top_k must be between 1 and {pred.num_classes} for model {tag!r}, got {top_k}")
        result = await self._predict(tag, pred, image, top_k)
        return JSONResponse(result) if isinstance(result, dict) else result

    @bentoml.api(route="/estimate_age")
    async def estimate_age(
        self, image: Path, model: str | None = None, max_faces: int | None = None, detect: bool = True
    ) -> dict[str, Any]:
        """Ages of the faces in a photo: ``{"faces": [{"box", "score", "age"}, ...], "model"}``, largest first.

        ``detect=false``: the image already is an aligned face chip (one face, the whole image, score null).
        """
        picked = self._pick(model, "regression")
        if isinstance(picked, JSONResponse):
            return picked
        tag, pred = picked
        if max_faces is not None and not 1 <= max_faces <= MAX_FACES:
            return error(400, f"max_faces must be between 1 and {MAX_FACES}, got {max_faces}")
        loop = asyncio.get_running_loop()
        try:  # decode + detect + align + preprocess, off the event loop
            prep = await loop.run_in_executor(
                DECODE_POOL, pred.prepare, image.read_bytes(), max_faces or MAX_FACES, detect
            )
        except ImageError as e:
            return error(400, str(e))
        outs = await asyncio.gather(*(self.batchers[tag].submit(x) for x in prep.inputs))
        faces = [
            {"box": r["box"], "score": r["score"], "age": r[pred.target_name]}
            for r in pred.face_results(prep, torch.stack(outs) if outs else torch.zeros(0))
        ]
        return JSONResponse({"faces": faces, "model": tag})

    @bentoml.api(route="/models")
    async def models(self) -> dict[str, Any]:
        """The same as ``GET /models``, for BentoML clients (which POST)."""
        return JSONResponse({"models": await anyio.to_thread.run_sync(models_info)})


for _api in (_Svertka.classify, _Svertka.estimate_age, _Svertka.models):
    _api.input_spec = strict_form(_api.input_spec)

# Model references at class scope, one attribute per configured tag, so `bentoml build` packs them.
for _i, _tag in enumerate(MODEL_TAGS):
    setattr(_Svertka, f"bento_model_{_i}", bentoml.models.BentoModel(_tag))

Svertka = bentoml.service(
    name="svertka",
    workers=WORKERS,
    traffic={"timeout": 60},
    logging={"access": {"enabled": ACCESS_LOG}},
    metrics={"enabled": METRICS},
    envs=[{"name": "SVERTKA_MODELS", "value": ",".join(MODEL_TAGS)}],
)(bentoml.asgi_app(info_app, path="/")(_Svertka))
Svertka.add_asgi_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)

__all__ = ["Svertka", "Batcher", "BodyLimitMiddleware", "models_info"]
