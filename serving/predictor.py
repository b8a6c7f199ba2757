"""One predictor for the HTTP service and the batch script, so the two cannot drift.

    >>> from serving.predictor import Predictor
    >>> p = Predictor("artifacts/quickstart")                  # a bundle folder (or (module, meta))
    >>> p.predict_files(["shirt.png"], top_k=3)
    [{'label': 'Shirt', 'score': 0.91, 'top_k': [{'label': 'Shirt', 'score': 0.91}, ...]}]

Everything comes from the bundle: architecture and weights (``models.bundle``), class names or
the regression target and its range, and the eval preprocessing (``data.preprocess``). Imports
neither Lightning nor ``training``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from data.preprocess import (
    DEFAULT_MAX_PIXELS,
    PreprocessSpec,
    decode_image,
    eval_transform,
    load_image,
    open_image,
    preprocess,
)
from models import heads
from models.bundle import BundleMeta, load_bundle


def auto_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ImageLoader:
    """Bytes or a file -> the model's input ``(C, h, w)``: small and picklable, for DataLoader workers."""

    def __init__(self, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.spec, self.max_pixels = spec, max_pixels
        self.transform = eval_transform(spec)  # built once, reused for every image

    def decode(self, src: bytes | str | Path) -> np.ndarray:
        """Bytes or a file -> uint8 ``(H, W, C)``; ``data.preprocess.ImageError`` if unusable."""
        return load_image(src, channels=self.spec.channels, max_pixels=self.max_pixels)

    def preprocess(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, C)`` -> float ``(C, h, w)``, the bundle's eval preprocessing."""
        return preprocess(arr, self.spec, self.transform)

    def open(self, src: bytes | str | Path) -> Image.Image:
        """Read the header only (size checked against ``max_pixels``); ``img.width * img.height`` is the work."""
        return open_image(src, max_pixels=self.max_pixels)

    def load_opened(self, img: Image.Image) -> torch.Tensor:
        """An image from ``open`` -> float ``(C, h, w)``: decode + preprocess; ``ImageError`` if unusable."""
        try:
            return self.preprocess(decode_image(img, self.spec.channels))
        finally:
            img.close()

    def __call__(self, src: bytes | str | Path) -> torch.Tensor:
        return self.preprocess(self.decode(src))


class Predictor:
    """Decode, preprocess, batch-forward and format, as the bundle says.

    ``bundle`` is a bundle folder or an already loaded ``(module, BundleMeta)`` pair.
    """

    def __init__(
        self,
        bundle: str | Path | tuple[nn.Module, BundleMeta],
        device: str | torch.device | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.device = auto_device(device)
        if isinstance(bundle, tuple):
            model, self.meta = bundle
            model = model.to(self.device).eval()
        else:
            model, self.meta = load_bundle(bundle, device=self.device)
        self.model = model
        self.max_pixels = max_pixels
        self.spec = self.meta.preprocess
        self.loader = ImageLoader(self.spec, max_pixels)
        self.task = self.meta.task
        self.class_names = self.meta.class_names or []
        self.target = self.meta.target or {}
        bins = self.meta.bins
        self.bins = torch.tensor(bins, dtype=torch.float32, device=self.device) if bins else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def target_name(self) -> str:
        return str(self.target.get("name", "value"))

    def decode(self, src: bytes | str | Path) -> np.ndarray:
        """Bytes or a file -> uint8 ``(H, W, C)``; ``data.preprocess.ImageError`` if unusable."""
        return self.loader.decode(src)

    def preprocess(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, C)`` -> float ``(C, h, w)``, the bundle's eval preprocessing."""
        return self.loader.preprocess(arr)

    def load(self, src: bytes | str | Path) -> torch.Tensor:
        """decode + preprocess: bytes or a file -> float ``(C, h, w)``."""
        return self.loader(src)

    @torch.inference_mode()
    def predict_tensors(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> class probabilities ``(B, N)`` or clamped regression values ``(B,)``, on CPU."""
        x = batch.to(self.device, non_blocking=True)
        out = heads.predict(self.model, x, self.task, self.bins, self.meta.tta)  # (B, N) or (B,)
        if self.task != "classification":
            out = out.clamp(float(self.target.get("min", -np.inf)), float(self.target.get("max", np.inf)))
        return out.cpu()

    def format(self, output: torch.Tensor, top_k: int = 5) -> dict[str, Any]:
        """One row of ``predict_tensors`` -> ``{"label", "score", "top_k"}`` or ``{target name: value}``."""
        if self.task != "classification":
            return {self.target_name: float(output)}
        k = max(1, min(int(top_k), self.num_classes))
        scores, idx = output.topk(k)
        pairs = zip(scores.tolist(), idx.tolist(), strict=True)
        top = [{"label": self.class_names[i], "score": float(s)} for s, i in pairs]
        return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}

    def predict_files(self, srcs: Sequence[bytes | str | Path], top_k: int = 5) -> list[dict[str, Any]]:
        """Decode, forward as one batch, format: one dict per input (raises ``ImageError`` on a bad one)."""
        batch = torch.stack([self.load(s) for s in srcs])  # (B, C, h, w)
        return [self.format(row, top_k) for row in self.predict_tensors(batch)]

    def info(self) -> dict[str, Any]:
        """What ``GET /models`` shows: task, architecture, classes or target, input spec, test metrics."""
        return describe(self.meta, self.max_pixels)


def describe(meta: BundleMeta, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """A bundle as ``GET /models`` shows it: task, architecture, classes or target, input, test metrics."""
    spec = meta.preprocess
    h, w = spec.input_size
    out: dict[str, Any] = {
        "task": meta.task,
        "architecture": meta.architecture["name"],
        "input": {
            "height": h,
            "width": w,
            "channels": spec.channels,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize": spec.resize,
            "max_pixels": max_pixels,
        },
        "metrics": {k: v for k, v in meta.metrics.items() if k.startswith("test")} or dict(meta.metrics),
        "tta": list(meta.tta),
    }
    if meta.task == "classification":
        out["class_names"] = list(meta.class_names or [])
    else:
        out["target"] = {k: v for k, v in (meta.target or {}).items() if k != "bins"}
        out["head"] = f"distribution over {len(meta.bins)} values" if meta.bins else "linear"
    return out
