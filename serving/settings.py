"""The service's settings: ``SVERTKA_*`` environment variables, parsed and checked once (the table, with
defaults: docs/SERVING.md, "Settings").

    >>> Settings.from_env({"SVERTKA_MODELS": "quickstart", "SVERTKA_WORKERS": "2"}).models
    ('quickstart:latest',)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import bentoml
import torch
from bentoml.exceptions import BentoMLException

from data.preprocess import DEFAULT_MAX_PIXELS
from serving.predictor import RUNTIMES

DEFAULT_MODELS = "quickstart:latest"
_BENTOML = "BENTOML_CONFIG_OPTIONS=services.svertka."
REMOVED = {  # settings of earlier versions -> what to do now (a warning at start, not an error)
    "SVERTKA_ACCESS_LOG": f"set {_BENTOML}logging.access.enabled=true",
    "SVERTKA_METRICS": f"set {_BENTOML}metrics.enabled=true",
    "SVERTKA_TRACING": f"set {_BENTOML}tracing.excluded_urls=null",
    **dict.fromkeys(
        ["SVERTKA_BALANCE", "SVERTKA_SOLO_THREADS", "SVERTKA_INLINE_PIXELS", "SVERTKA_INLINE_FORWARD_MS",
         "SVERTKA_FULL_GC_S"],
        "it is gone (docs/SERVING.md, 'Measuring it')",
    ),
}  # fmt: skip


class SettingsError(BentoMLException):
    """A setting that cannot work; a ``BentoMLException``: ``bentoml serve`` prints its one line and exits 1."""


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Every ``SVERTKA_*`` setting of the service, checked."""

    models: tuple[str, ...]
    workers: int
    torch_threads: int
    device: str | None
    runtime: str
    max_batch_size: int
    batch_wait_ms: int
    max_in_flight: int
    max_body_bytes: int
    max_pixels: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Parse ``env``; ``SettingsError`` on the first bad value."""
        # once, from `bentoml serve` itself (or a direct call): not again from every worker
        for name in sorted(REMOVED.keys() & env.keys()) if bentoml.server_context.worker_index is None else []:
            print(f"warning: {name} is no longer read: {REMOVED[name]}", file=sys.stderr, flush=True)
        raw = [t.strip() for t in (env.get("SVERTKA_MODELS", "").strip() or DEFAULT_MODELS).split(",") if t.strip()]
        models = tuple(dict.fromkeys(t if ":" in t else f"{t}:latest" for t in raw))  # "a, b:v1" -> a:latest, b:v1
        if not models:
            raise SettingsError("SVERTKA_MODELS names no model")
        device = env.get("SVERTKA_DEVICE", "").strip() or None
        runtime = env.get("SVERTKA_RUNTIME", "").strip().lower() or "auto"
        if runtime not in RUNTIMES:
            raise SettingsError(f"SVERTKA_RUNTIME={runtime!r} must be auto, onnx or torch")
        if runtime == "onnx" and (device or "").startswith("cuda"):
            raise SettingsError(f"SVERTKA_RUNTIME=onnx runs on the CPU (ONNX Runtime), not SVERTKA_DEVICE={device}")
        use_gpu = device != "cpu" and torch.cuda.is_available()
        workers = _int(env, "SVERTKA_WORKERS", 1 if use_gpu else cpu_count(), minimum=1)
        return cls(
            models=models,
            workers=workers,
            torch_threads=_int(env, "SVERTKA_TORCH_THREADS", max(1, cpu_count() // workers), minimum=1),
            device=device,
            runtime=runtime,
            max_batch_size=_int(env, "SVERTKA_MAX_BATCH_SIZE", 32, minimum=1),
            batch_wait_ms=_int(env, "SVERTKA_BATCH_WAIT_MS", 0),
            max_in_flight=_int(env, "SVERTKA_MAX_IN_FLIGHT", 64, minimum=1),
            max_body_bytes=_int(env, "SVERTKA_MAX_BODY_BYTES", 20 * 1024 * 1024, minimum=1),
            max_pixels=_int(env, "SVERTKA_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
        )

    def check_models(self) -> None:
        """``SettingsError`` naming the first configured model that is not a usable bundle in the store."""
        from data.faces import FaceStageError, check_available
        from models.bundle import BundleError, check_weights, read_meta, read_onnx
        from models.store import bundle_dir_for_tag

        for tag in self.models:
            try:
                folder = bundle_dir_for_tag(tag)
                meta = read_meta(folder)  # a bundle.json that would load anything from outside: refused
                check_weights(folder, meta)  # every file as bundle.json says: a tampered one refuses the start
                if meta.onnx:
                    read_onnx(folder, meta)
                elif self.runtime == "onnx":
                    raise BundleError(f"{folder}: no model.onnx, and SVERTKA_RUNTIME=onnx")
                if meta.faces:  # a model of aligned face chips: the face stage (dlib, landmark model) must be here
                    check_available(folder)
            except BundleError as e:
                raise SettingsError(
                    f"SVERTKA_MODELS names {tag!r}: {e}. Save a bundle there with "
                    "`python -m training.export --ckpt CKPT --out DIR --bentoml NAME` or set SVERTKA_MODELS."
                ) from None
            except FaceStageError as e:
                raise SettingsError(f"SVERTKA_MODELS names {tag!r}, whose model needs face detection: {e}") from None
