"""BentoML's own adaptive batching, for ``serve_load.py --variants``: the comparison of issue #9.

    SVERTKA_BENCH_BUNDLE=artifacts/quickstart bentoml serve benchmarks._serve_bentoml_batching:BentoBatching

``POST /classify`` with a multipart ``image`` file, batched by BentoML 1.4
(``@bentoml.api(batchable=True)``: its dispatcher groups concurrent requests, up to
``max_batch_size``, waiting at most ``max_latency_ms``). A batchable API takes exactly one
argument (BentoML 1.4 raises "Batch inference function only accept one argument" otherwise), so
this variant has no ``top_k``/``model`` fields: it measures the library's batching on the same
decode, preprocessing and forward as the service, not a drop-in replacement for ``/classify``.
Workers and torch threads as the service's defaults (one per core).
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import torch

from data.preprocess import ImageError
from serving.predictor import Predictor
from serving.settings import cpu_count

WORKERS = int(os.environ.get("SVERTKA_WORKERS") or cpu_count())


@bentoml.service(name="bento_batching", workers=WORKERS, logging={"access": {"enabled": False}})
class BentoBatching:
    """One model, classify only, batched by BentoML."""

    def __init__(self) -> None:
        torch.set_num_threads(max(1, cpu_count() // WORKERS))
        self.pred = Predictor(os.environ["SVERTKA_BENCH_BUNDLE"], device="cpu")

    @bentoml.api(route="/classify", batchable=True, max_batch_size=32, max_latency_ms=1000)
    def classify(self, image: list[Path]) -> list[dict]:
        """``B`` uploads -> ``B`` answers ``{"label", "score", "top_k"}`` (or ``{"error"}``)."""
        xs, answers = [], []
        for path in image:
            try:
                xs.append(self.pred.load(path.read_bytes()))  # (C, h, w)
                answers.append(None)
            except ImageError as e:
                answers.append({"error": str(e)})
        out = iter(self.pred.predict_tensors(torch.stack(xs)) if xs else [])  # (B', N)
        return [a if a is not None else self.pred.format(next(out), 5) for a in answers]
