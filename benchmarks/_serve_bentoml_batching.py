"""BentoML's own adaptive batching, for ``serve_load.py --variants``: the comparison of issue #9.

    SVERTKA_BENCH_BUNDLE=artifacts/quickstart bentoml serve benchmarks._serve_bentoml_batching:BentoBatching

``POST /classify`` with a multipart ``image`` file, batched by BentoML 1.4
(``@bentoml.api(batchable=True)``: its dispatcher groups concurrent requests, up to
``max_batch_size``, waiting at most ``max_latency_ms``). A batchable API takes exactly one
argument (BentoML 1.4 raises "Batch inference function only accept one argument" otherwise), so
this variant has no ``top_k``/``model`` fields: it measures the library's batching on the same
decode, preprocessing and forward as the service, not a drop-in replacement for ``/classify``.
Workers, torch threads and the forward (``SVERTKA_RUNTIME``) as the service's settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import torch

from data.preprocess import ImageError
from serving.predictor import Predictor
from serving.settings import Settings

SETTINGS = Settings.from_env({k: v for k, v in os.environ.items() if k != "SVERTKA_MODELS"})


@bentoml.service(name="bento_batching", workers=SETTINGS.workers, logging={"access": {"enabled": False}})
class BentoBatching:
    """One model, classify only, batched by BentoML."""

    def __init__(self) -> None:
        torch.set_num_threads(SETTINGS.torch_threads)
        bundle = os.environ["SVERTKA_BENCH_BUNDLE"]
        self.pred = Predictor(bundle, "cpu", SETTINGS.max_pixels, runtime=SETTINGS.runtime)

    @bentoml.api(route="/classify", batchable=True, max_batch_size=32, max_latency_ms=1000)
    def classify(self, image: list[Path]) -> list[dict]:
        """``B`` uploads -> ``B`` answers ``{"label", "score", "top_k"}`` (or ``{"error"}``)."""
        xs, answers = [], []
        for path in image:
            try:
                xs.append(self.pred.prepare(path.read_bytes(), detect=False).inputs[0])  # (C, h, w)
                answers.append(None)
            except ImageError as e:
                answers.append({"error": str(e)})
        out = iter(self.pred.predict_tensors(torch.stack(xs)) if xs else [])  # (B', N)
        return [a if a is not None else self.pred.format(next(out), 5) for a in answers]
