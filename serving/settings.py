"""The service's settings: ``SVERTKA_*`` environment variables, parsed and checked once.

    >>> from serving.settings import Settings
    >>> Settings.from_env({"SVERTKA_MODELS": "quickstart", "SVERTKA_WORKERS": "2"}).models
    ('quickstart:latest',)

A bad value raises ``SettingsError`` naming the variable. It is a ``BentoMLException``, so
``bentoml serve`` prints it as one line (``Error: [serve] `serve` failed: SVERTKA_...``) and
exits 1, without a traceback.

    SVERTKA_MODELS            comma-separated BentoML model tags            (quickstart:latest)
    SVERTKA_WORKERS           worker processes                              (CPU count, 1 with a GPU)
    SVERTKA_TORCH_THREADS     torch threads per worker                      (CPU count / workers)
    SVERTKA_SOLO_THREADS      torch threads for a lone request in a worker  (CPU count)
    SVERTKA_MAX_BATCH_SIZE    largest forward batch                         (32)
    SVERTKA_BATCH_WAIT_MS     how long a batch waits for more requests      (0: take what is queued)
    SVERTKA_MAX_IN_FLIGHT     requests one worker holds at once; past it 503 (64)
    SVERTKA_MAX_BODY_BYTES    largest request body                          (20 MiB)
    SVERTKA_MAX_PIXELS        largest image (width x height), from its header (40 M)
    SVERTKA_INLINE_PIXELS     images up to this many pixels decode on the event loop (65536)
    SVERTKA_INLINE_FORWARD_MS forward passes expected to take at most this run on the event loop (2)
    SVERTKA_BALANCE           1: even out keep-alive connections across workers (1)
    SVERTKA_DEVICE            cpu, cuda, cuda:1, ...                        (cuda when available)
    SVERTKA_ACCESS_LOG        1: log every request                          (0)
    SVERTKA_METRICS           1: Prometheus metrics at /metrics             (0)
    SVERTKA_TRACING           1: BentoML's OpenTelemetry middleware on each request (0)
    SVERTKA_FULL_GC_S         seconds between full garbage collections; 0: Python's own schedule (300)
    SVERTKA_RUNTIME           onnx, torch, or auto: ONNX Runtime on a CPU when the bundle has model.onnx (auto)
    SVERTKA_OPTIMIZE          1: torch runtime on a CPU, forward as TorchScript frozen for inference (1)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from bentoml.exceptions import BentoMLException

from data.preprocess import DEFAULT_MAX_PIXELS

DEFAULT_MODELS = "quickstart:latest"


class SettingsError(BentoMLException):
    """A setting that cannot work: one line naming the variable and what is wrong."""


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


def parse_tags(raw: str) -> tuple[str, ...]:
    """``"a, b:v1"`` -> ``("a:latest", "b:v1")``, in order, without repeats."""
    tags = [t.strip() if ":" in t else f"{t.strip()}:latest" for t in raw.split(",") if t.strip()]
    return tuple(dict.fromkeys(tags))


@dataclass(frozen=True)
class Settings:
    """Every ``SVERTKA_*`` setting of the service, checked."""

    models: tuple[str, ...]
    workers: int
    torch_threads: int
    solo_threads: int
    max_batch_size: int
    batch_wait_ms: int
    max_in_flight: int
    max_body_bytes: int
    max_pixels: int
    inline_pixels: int
    inline_forward_ms: int
    balance: bool
    device: str | None
    access_log: bool
    metrics: bool
    tracing: bool
    full_gc_s: int
    optimize: bool
    runtime: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse ``env`` (default ``os.environ``); ``SettingsError`` on the first bad value."""
        env = os.environ if env is None else env
        models = parse_tags(env.get("SVERTKA_MODELS", "").strip() or DEFAULT_MODELS)
        if not models:
            raise SettingsError("SVERTKA_MODELS names no model")
        device = env.get("SVERTKA_DEVICE", "").strip() or None
        use_gpu = device != "cpu" and _cuda_available()
        workers = _int(env, "SVERTKA_WORKERS", 1 if use_gpu else cpu_count(), minimum=1)
        return cls(
            models=models,
            workers=workers,
            torch_threads=_int(env, "SVERTKA_TORCH_THREADS", max(1, cpu_count() // workers), minimum=1),
            # A worker holding one request is not busy: let a lone request use every core.
            solo_threads=_int(env, "SVERTKA_SOLO_THREADS", cpu_count(), minimum=1),
            max_batch_size=_int(env, "SVERTKA_MAX_BATCH_SIZE", 32, minimum=1),
            batch_wait_ms=_int(env, "SVERTKA_BATCH_WAIT_MS", 0),
            max_in_flight=_int(env, "SVERTKA_MAX_IN_FLIGHT", 64, minimum=1),
            max_body_bytes=_int(env, "SVERTKA_MAX_BODY_BYTES", 20 * 1024 * 1024, minimum=1),
            max_pixels=_int(env, "SVERTKA_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
            inline_pixels=_int(env, "SVERTKA_INLINE_PIXELS", 256 * 256),
            # A small model's forward (simple_cnn: ~0.3 ms) costs less than the hop to a thread and back.
            inline_forward_ms=_int(env, "SVERTKA_INLINE_FORWARD_MS", 2),
            balance=_int(env, "SVERTKA_BALANCE", 1) > 0,
            device=device,
            # BentoML's per-request access log line and Prometheus metrics cost ~1 ms of CPU per
            # request, 20% of a small model's whole cost: off unless asked for.
            access_log=_int(env, "SVERTKA_ACCESS_LOG", 0) > 0,
            metrics=_int(env, "SVERTKA_METRICS", 0) > 0,
            # BentoML runs every request through OpenTelemetry's ASGI middleware (spans for the request
            # and each message sent) even at its default sample rate of 0, which records nothing: 0.5-0.7
            # ms of CPU per request (docs/RESULTS.md). Off unless asked for (with a tracing exporter configured).
            tracing=_int(env, "SVERTKA_TRACING", 0) > 0,
            # Python's automatic full collections scanned BentoML's per-request 60 s timers (~160k objects
            # per worker under load) every ~1.4 s, stalling the worker 45-140 ms each time (docs/SERVING.md).
            full_gc_s=_int(env, "SVERTKA_FULL_GC_S", 300),
            # TorchScript + oneDNN, checked against the model at start (serving.predictor.trace_for_cpu):
            # resnet18 forwards 25-28 % faster on one thread.
            optimize=_int(env, "SVERTKA_OPTIMIZE", 1) > 0,
            # ONNX Runtime over the bundle's model.onnx (serving.predictor): resnet18 1.2-1.9x TorchScript's speed
            runtime=_runtime(env, device),
        )

    def check_models(self) -> None:
        """``SettingsError`` naming the first configured model that is not a bundle in the store, or whose
        face stage (a bundle with a ``faces`` entry: dlib and the landmark model) is missing."""
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
            except BundleError as e:
                raise SettingsError(
                    f"SVERTKA_MODELS names {tag!r}: {e}. Save a bundle there with "
                    "`python -m training.export --ckpt CKPT --out DIR --bentoml NAME` or set SVERTKA_MODELS."
                ) from None
            try:
                if meta.faces:  # a model of aligned face chips: the face stage (dlib, landmark model) must be here
                    check_available(folder)
            except FaceStageError as e:
                raise SettingsError(f"SVERTKA_MODELS names {tag!r}, whose model needs face detection: {e}") from None


def _runtime(env: Mapping[str, str], device: str | None) -> str:
    raw = env.get("SVERTKA_RUNTIME", "").strip().lower() or "auto"
    if raw not in ("auto", "onnx", "torch"):
        raise SettingsError(f"SVERTKA_RUNTIME={raw!r} must be auto, onnx or torch")
    if raw == "onnx" and (device or "").startswith("cuda"):
        raise SettingsError(f"SVERTKA_RUNTIME=onnx runs on the CPU (ONNX Runtime), not SVERTKA_DEVICE={device}")
    return raw


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
