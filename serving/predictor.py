"""One predictor for the HTTP service and the batch script, so the two cannot drift: everything comes from the
bundle (``models.bundle``), and ``runtime`` picks ONNX Runtime or torch (docs/SERVING.md, "Settings").

    >>> Predictor("artifacts/quickstart").predict_files(["shirt.png"], top_k=3)
    [{'label': 'Shirt', 'score': 0.91, 'top_k': [{'label': 'Shirt', 'score': 0.91}, ...]}]
    >>> prep = Predictor("artifacts/utkface_age").prepare("group.jpg", max_faces=5)  # a face model: faces first
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from data.faces import DetectSettings, FaceAligner, FaceFraming
from data.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image, eval_transform, open_image, preprocess
from models import heads
from models.bundle import BundleError, BundleMeta, check_weights, load_bundle, read_meta, read_onnx

RUNTIMES = ("auto", "onnx", "torch")


def pick_runtime(runtime: str, meta: BundleMeta, device: torch.device) -> str:
    """``"onnx"`` or ``"torch"`` for ``runtime``; ``ValueError``/``BundleError`` if it cannot run here."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" and meta.onnx else "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise ValueError(f"runtime 'onnx' runs on the CPU (ONNX Runtime's CPU provider), not on {device}")
        if not meta.onnx:
            where = meta.path or "the bundle"
            raise BundleError(
                f"{where}: no model.onnx to run (add it with `python -m training.export --bundle {where} --onnx`)"
            )
    return runtime


class OnnxForward:
    """The bundle's ``model.onnx`` in ONNX Runtime, CPU: ``(B, C, h, w)`` -> what ``heads.predict`` gives; one
    session per thread count (``torch.get_num_threads()``), made when first asked for."""

    def __init__(self, data: bytes, meta: BundleMeta) -> None:
        self.data, self.input = data, str(meta.onnx.get("input", "input"))
        self.sessions: dict[int, Any] = {}

    def session(self, threads: int) -> Any:
        if threads not in self.sessions:
            from models.onnx_graph import open_session

            self.sessions[threads] = open_session(self.data, threads)
        return self.sessions[threads]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session(torch.get_num_threads()).run(None, {self.input: batch})[0])


@dataclass
class Prepared:
    """One image made ready for the model: its faces (``{"box": [x0, y0, x1, y1], "score"}``, largest first; or
    the whole image as one face, score None) and their inputs."""

    faces: list[dict[str, Any]]
    inputs: torch.Tensor  # (K, C, h, w), K = len(faces), 0 when no face was found
    size: tuple[int, int]  # (width, height) of the decoded image


class ImageLoader:
    """Bytes or a file -> the model's inputs (``prepare``: one ``(C, h, w)`` per face with an ``aligner`` and
    ``detect``, else the whole image); small and picklable, for DataLoader workers."""

    def __init__(
        self, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS, aligner: FaceAligner | None = None
    ) -> None:
        self.spec, self.max_pixels, self.aligner = spec, max_pixels, aligner
        self.transform = eval_transform(spec)  # built once, reused for every image

    def open(self, src: bytes | str | Path) -> Image.Image:
        """Read the header only (size checked against ``max_pixels``); ``img.width * img.height`` is the work."""
        return open_image(src, max_pixels=self.max_pixels)

    def decode(self, src: bytes | str | Path | Image.Image) -> np.ndarray:
        """Bytes, a file or an image from ``open`` (closed here) -> uint8 ``(H, W, C)``; ``ImageError`` if unusable."""
        img = src if isinstance(src, Image.Image) else self.open(src)
        try:
            return decode_image(img, self.spec.channels)
        finally:
            img.close()

    def preprocess(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, C)`` -> float ``(C, h, w)``, the bundle's eval preprocessing."""
        return preprocess(arr, self.spec, self.transform)

    def prepare(
        self, src: bytes | str | Path | np.ndarray | Image.Image, max_faces: int | None = None, detect: bool = True
    ) -> Prepared:
        """One input per face found (with an aligner and ``detect``), else the whole image as one input."""
        arr = src if isinstance(src, np.ndarray) else self.decode(src)
        h, w = arr.shape[:2]
        if self.aligner is None or not detect:
            return Prepared([{"box": [0, 0, w, h], "score": None}], self.preprocess(arr)[None], (w, h))
        found = self.aligner(arr, max_faces=max_faces)
        c, (ih, iw) = self.spec.channels, self.spec.input_size
        inputs = torch.stack([self.preprocess(f.chip) for f in found]) if found else torch.zeros(0, c, ih, iw)
        return Prepared([{"box": list(f.box), "score": f.score} for f in found], inputs, (w, h))


class Predictor:
    """Decode, preprocess, batch-forward and format, as the bundle (a folder or a loaded ``(module, meta)``) says."""

    def __init__(
        self,
        bundle: str | Path | tuple[nn.Module, BundleMeta],
        device: str | torch.device | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        face_settings: DetectSettings | None = None,
        runtime: str = "auto",
    ) -> None:
        auto = device is None or str(device) == "auto"  # CUDA when available, else CPU
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else device)
        loaded = isinstance(bundle, tuple)
        self.meta = meta = bundle[1] if loaded else read_meta(bundle)
        # a loaded module handed in runs as it is unless runtime="onnx" asks for the bundle's graph
        self.runtime = pick_runtime("torch" if loaded and runtime == "auto" else runtime, meta, self.device)
        self.onnx: OnnxForward | None = None
        self.model: nn.Module | None = None
        if self.runtime == "onnx":  # ONNX Runtime never needs the torch module: not built
            if meta.path is None:
                raise BundleError("runtime 'onnx' needs the bundle's folder (its model.onnx), not a loaded module")
            if not loaded:
                check_weights(meta.path, meta)  # every file of the bundle is as bundle.json says
            self.onnx = OnnxForward(read_onnx(meta.path, meta), meta)
        elif loaded:
            self.model = bundle[0].to(self.device).eval()
        else:
            self.model, self.meta = load_bundle(bundle, device=self.device)
        self.max_pixels, self.spec, self.task = max_pixels, self.meta.preprocess, self.meta.task
        # a face model: find and align faces first (data.faces.FaceStageError when dlib or its model is missing)
        self.framing = FaceFraming.from_dict(self.meta.faces) if self.meta.faces else None
        aligner = FaceAligner(self.framing, face_settings, self.meta.path) if self.framing else None
        self.loader = ImageLoader(self.spec, max_pixels, aligner)
        self.prepare = self.loader.prepare  # an image's faces and their inputs
        self.uses_faces = self.framing is not None  # the model expects aligned face chips
        self.class_names = self.meta.class_names or []
        self.num_classes = len(self.class_names)
        self.target = self.meta.target or {}
        self.target_name = str(self.target.get("name", "value"))
        self.bins = torch.tensor(self.meta.bins, dtype=torch.float32, device=self.device) if self.meta.bins else None

    def face_results(self, prepared: Prepared, outputs: torch.Tensor, top_k: int = 5) -> list[dict[str, Any]]:
        """``[{"box", "score", <target name> (e.g. "age") or label/score/top_k}, ...]``, one per face."""
        results = [self.format(row, top_k) for row in outputs]
        if self.task == "classification":  # "score" is the face's
            results = [{"label": r["label"], "label_score": r["score"], "top_k": r["top_k"]} for r in results]
        return [{"box": f["box"], "score": f["score"], **r} for f, r in zip(prepared.faces, results, strict=True)]

    @torch.inference_mode()
    def predict_tensors(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> class probabilities ``(B, N)`` or clamped regression values ``(B,)``, on CPU."""
        if self.onnx is not None:  # the graph holds the decoding and the test-time augmentation
            out = self.onnx(batch)  # (B, N) or (B,)
        else:
            x = batch.to(self.device, non_blocking=True)
            out = heads.predict(self.model, x, self.task, self.bins, self.meta.tta)  # (B, N) or (B,)
        if self.task != "classification":
            out = out.clamp(float(self.target.get("min", -np.inf)), float(self.target.get("max", np.inf)))
        return out.cpu()

    def warm_up(self, max_batch_size: int, budget_s: float = 1.0) -> int:
        """Forwards at batch sizes 1, 2, ... ``max_batch_size`` until ``budget_s`` is spent (ONNX Runtime plans
        its memory per shape: at start, not on the first requests); how many ran."""
        c, (h, w) = self.spec.channels, self.spec.input_size
        start = time.perf_counter()
        for n in range(1, max_batch_size + 1):
            self.predict_tensors(torch.zeros(n, c, h, w))
            if time.perf_counter() - start > budget_s:
                return n
        return max_batch_size

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
        batch = torch.cat([self.prepare(s, detect=False).inputs for s in srcs])  # the whole images: (B, C, h, w)
        return [self.format(row, top_k) for row in self.predict_tensors(batch)]

    def info(self) -> dict[str, Any]:
        """What ``GET /models`` shows: task, architecture, classes or target, input spec, test metrics, runtime."""
        meta, spec = self.meta, self.spec
        out: dict[str, Any] = {
            "task": meta.task,
            "architecture": meta.architecture["name"],
            "input": {
                "height": spec.input_size[0],
                "width": spec.input_size[1],
                "channels": spec.channels,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "resize": spec.resize,
                "max_pixels": self.max_pixels,
            },
            "metrics": {k: v for k, v in meta.metrics.items() if k.startswith("test")} or dict(meta.metrics),
            "tta": list(meta.tta),
            "faces": meta.faces,  # {"aligned", "size", "points" | "padding"}: faces are found and aligned first
        }
        if meta.task == "classification":
            out["class_names"] = list(meta.class_names or [])
        else:
            out["target"] = {k: v for k, v in (meta.target or {}).items() if k != "bins"}
            out["head"] = f"distribution over {len(meta.bins)} values" if meta.bins else "linear"
        return {**out, "runtime": self.runtime}
