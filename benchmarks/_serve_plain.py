"""The plain peer for ``serve_load.py``: the Starlette app a user would write by hand, under uvicorn.

    SVERTKA_BENCH_BUNDLE=artifacts/quickstart SVERTKA_BENCH_THREADS=1 \
        uvicorn --app-dir benchmarks _serve_plain:app --workers 2

``POST /classify`` with a multipart ``image`` file: decode (``data.preprocess.load_image``), the
bundle's eval preprocessing and a batch-of-one eager forward under ``torch.inference_mode``, inline
in the request handler (each worker runs its requests one at a time). No batching, no TorchScript.
``SVERTKA_BENCH_THREADS`` sets ``torch.set_num_threads`` in each worker (unset: torch's default,
every core). Answers ``{"label", "score", "top_k"}`` like the service.
"""

from __future__ import annotations

import os

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from data.preprocess import ImageError, eval_transform, load_image, preprocess
from models.bundle import load_bundle

if os.environ.get("SVERTKA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SVERTKA_BENCH_THREADS"]))
model, meta = load_bundle(os.environ["SVERTKA_BENCH_BUNDLE"])
spec = meta.preprocess
transform = eval_transform(spec)
names = meta.class_names or []


async def classify(request: Request) -> JSONResponse:
    form = await request.form()
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        return JSONResponse({"error": "send a multipart 'image' file"}, status_code=400)
    data = await upload.read()
    try:
        x = preprocess(load_image(data, spec.channels), spec, transform)  # (C, h, w)
    except ImageError as e:
        return JSONResponse({"error": str(e)}, status_code=400)
    with torch.inference_mode():
        probs = model(x[None]).softmax(dim=1)[0]  # (1, C, h, w) -> (N,)
    scores, idx = probs.topk(min(5, len(names)))
    top = [{"label": names[i], "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]
    return JSONResponse({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/healthz", healthz)])
