"""Self-describing model bundles: a folder with ``model.safetensors``, ``model.onnx`` and ``bundle.json``.

    >>> from models.bundle import load_bundle
    >>> net, meta = load_bundle("artifacts/quickstart")   # eval-mode nn.Module + BundleMeta
    >>> meta.task, meta.class_names, meta.preprocess.input_size

``bundle.json`` holds everything needed to use the weights: the task, the architecture
(registry name + arguments), class names or the regression target and its range, the eval
preprocessing, recorded metrics, the training config, library versions and the sha256 of
the weights and of ``model.onnx``. Loading imports no Lightning and never unpickles (safetensors only).

``model.onnx`` (``models.onnx_graph``) is the same network with the bundle's decoding and test-time
augmentation inside: preprocessed ``(B, C, H, W)`` float32 in, probabilities ``(B, N)`` or values
``(B,)`` out, for ONNX Runtime or any other ONNX runtime. ``save_bundle`` writes it after checking
it against the torch module; ``add_onnx`` adds it to an older bundle. It is read only from inside
the bundle folder and only after its sha256 matches ``bundle.json`` (``read_onnx``).

A bundle loads nothing from outside its folder: the architecture arguments must be ones the
registry's builder names in its signature, ``weights`` is refused (the weights are
``model.safetensors``), and so is any argument value that looks like a path or a URL.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from data.imagefile import sha256_file
from data.preprocess import PreprocessSpec
from models.heads import check_tta
from models.onnx_graph import ONNX_FILE, OnnxMismatch, export_onnx

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
Task = Literal["classification", "regression"]


class BundleError(ValueError):
    """A bundle that is missing, corrupt, truncated or does not match its metadata."""


# A string that names something outside the bundle: a URL or scheme ("http://", "file:", "C:"), a
# path ("/", "\\", "~", "./"), or a weights file name ("resnet18.pth").
_EXTERNAL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|[/\\]|^[~.]|\.(safetensors|pth?|bin|ckpt|onnx|pkl)$", re.I)


def check_architecture(name: str, kwargs: dict[str, Any], where: str = "architecture") -> None:
    """``BundleError`` naming the key unless ``kwargs`` are plain arguments the builder of ``name`` accepts.

    Refused: ``weights`` (a bundle's weights are its own ``model.safetensors``), a key the builder's
    signature does not name, a value that is not plain JSON data, and any string (also inside lists
    and dicts) that looks like a path or a URL.
    """
    import models  # noqa: F401  (registers every architecture)
    from models.registry import get_model_builder

    try:
        builder = get_model_builder(name)
    except ValueError as e:
        raise BundleError(f"{where}: cannot build architecture {name!r}: {e}") from None
    params = inspect.signature(builder).parameters
    accepted = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k != "weights"}
    for key, value in kwargs.items():
        if key == "weights":
            raise BundleError(
                f"{where}: architecture argument 'weights' is refused: a bundle loads only its own {WEIGHTS_FILE}"
            )
        if key not in accepted:
            raise BundleError(
                f"{where}: architecture argument {key!r} is not one {name!r} accepts ({', '.join(sorted(accepted))})"
            )
        for leaf in _leaves(value):
            if leaf is not None and not isinstance(leaf, (bool, int, float, str)):
                kind = type(leaf).__name__
                raise BundleError(f"{where}: architecture argument {key!r} holds a {kind}, not JSON data")
            if isinstance(leaf, str) and _EXTERNAL.search(leaf):
                raise BundleError(
                    f"{where}: architecture argument {key!r} looks like a path or URL ({leaf[:60]!r}): "
                    "a bundle loads nothing from outside its folder"
                )


def _leaves(value: Any) -> list[Any]:
    """Every scalar inside nested lists and dicts (dict keys included)."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in (*_leaves(k), *_leaves(v))]
    return [value]


@dataclass
class BundleMeta:
    """The parsed ``bundle.json``."""

    task: Task
    architecture: dict[str, Any]  # {"name": registry name, "kwargs": {...}}
    preprocess: PreprocessSpec
    class_names: list[str] | None = None
    target: dict[str, Any] | None = None  # {"name": "age", "min": 0.0, "max": 116.0[, "bins": [...]]}
    tta: list[str] = field(default_factory=list)  # test-time augmentation, e.g. ["hflip"] (models.heads)
    faces: dict[str, Any] | None = None  # {"aligned": true, "size": 200, "padding": 0.25}: input is a face chip
    metrics: dict[str, float] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] | None = None  # the training augmentation (A.to_dict), never used at inference
    versions: dict[str, str] = field(default_factory=dict)
    weights_sha256: str = ""
    onnx: dict[str, Any] | None = None  # {"sha256", "opset", "input", "output", ...}: model.onnx; None: none
    created: str = ""
    format_version: int = FORMAT_VERSION
    path: Path | None = None

    @property
    def num_outputs(self) -> int:
        if self.task == "classification":
            return len(self.class_names or [])
        return len(self.bins) if self.bins is not None else 1

    @property
    def bins(self) -> list[float] | None:
        """Target values of a distribution head (the network outputs one logit per bin), else None."""
        bins = (self.target or {}).get("bins")
        return [float(b) for b in bins] if bins else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "task": self.task,
            "architecture": self.architecture,
            "class_names": self.class_names,
            "target": self.target,
            "tta": self.tta,
            "faces": self.faces,
            "preprocess": self.preprocess.to_dict(),
            "metrics": self.metrics,
            "training_config": self.training_config,
            "augmentation": self.augmentation,
            "versions": self.versions,
            "weights_sha256": self.weights_sha256,
            "onnx": self.onnx,
            "created": self.created,
        }


def _check_faces(faces: Any) -> dict[str, Any] | None:
    """A ``faces`` entry normalized (``data.faces.FaceFraming``), or None; ``BundleError`` if invalid.

    A bundle with the entry expects aligned face chips framed that way: serving detects and aligns
    faces before the model. A bundle without it (older ones, non-face models) gets the whole image.
    """
    if faces is None or faces is False:
        return None
    from data.faces import FaceFraming

    if not isinstance(faces, dict):
        raise BundleError(f"'faces' must be an object like {{'size': 200, 'padding': 0.25}}, got {faces!r}")
    try:
        return FaceFraming.from_dict(faces).to_dict()
    except (TypeError, ValueError) as e:
        raise BundleError(f"invalid 'faces' entry: {e}") from None


def _check_onnx(entry: Any) -> dict[str, Any] | None:
    """The ``onnx`` entry of ``bundle.json`` (None: the bundle has no ``model.onnx``); ``BundleError`` if invalid.

    The graph is always ``model.onnx`` inside the bundle: nothing in the entry names a file to load.
    """
    if entry is None:
        return None
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise BundleError(f"'onnx' must be an object with the sha256 of {ONNX_FILE}, got {str(entry)[:80]!r}")
    if not all(isinstance(entry.get(k, ""), str) for k in ("input", "output")):
        raise BundleError("'onnx': 'input' and 'output' must be tensor names")
    return dict(entry)


def _export(
    net: nn.Module, out: Path, task: str, bins: list[float] | None, tta: list[str], shape: tuple[int, int, int]
) -> dict[str, Any]:
    """``models.onnx_graph.export_onnx``, its refusal as a ``BundleError``."""
    try:
        return export_onnx(net, out, task=task, bins=bins, tta=tta, input_shape=shape)
    except OnnxMismatch as e:
        raise BundleError(f"{e}: bundle not written") from None


def _versions() -> dict[str, str]:
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        from importlib.metadata import version

        out["svertka"] = version("svertka")
    except Exception:  # running from a source tree that is not installed
        out["svertka"] = "dev"
    return out


def _jsonable(obj: Any) -> Any:
    """Make a config JSON-safe (paths, tuples, numpy scalars, ...) without losing its shape."""
    return json.loads(json.dumps(obj, default=str))


def save_bundle(
    out_dir: str | Path,
    model: nn.Module,
    *,
    task: Task,
    architecture: str,
    architecture_kwargs: dict[str, Any],
    preprocess: PreprocessSpec,
    class_names: list[str] | None = None,
    target: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    training_config: dict[str, Any] | None = None,
    tta: list[str] | None = None,
    faces: dict[str, Any] | None = None,
    augmentation: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and metadata to ``out_dir`` (replaced whole, never half-written)."""
    if task not in ("classification", "regression"):
        raise BundleError(f"task must be 'classification' or 'regression', got {task!r}")
    if task == "classification" and not class_names:
        raise BundleError("a classification bundle needs class_names")
    if task == "regression" and not target:
        raise BundleError("a regression bundle needs a target, e.g. {'name': 'age', 'min': 0, 'max': 116}")
    try:
        tta = check_tta(tta)
    except ValueError as e:
        raise BundleError(str(e)) from None
    faces = _check_faces(faces)
    kwargs = _jsonable({k: v for k, v in architecture_kwargs.items() if k != "weights"})  # weights: the file
    check_architecture(architecture, kwargs)  # a bundle that would not load is never written
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state_model = model
        if hasattr(model, "_orig_mod"):  # torch.compile wrapper
            state_model = model._orig_mod
        save_model(state_model, str(tmp / WEIGHTS_FILE))
        spec_shape = (preprocess.channels, *preprocess.input_size)
        bins = (target or {}).get("bins") if task == "regression" else None
        onnx = _export(state_model, tmp / ONNX_FILE, task, bins, tta, spec_shape)
        meta = BundleMeta(
            task=task,
            architecture={"name": architecture, "kwargs": kwargs},
            preprocess=preprocess,
            class_names=[str(c) for c in class_names] if class_names else None,
            target=_jsonable(target) if target else None,
            tta=tta,
            faces=faces,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            training_config=_jsonable(training_config or {}),
            augmentation=_jsonable(augmentation) if augmentation else None,
            versions=_versions(),
            weights_sha256=sha256_file(tmp / WEIGHTS_FILE),
            onnx=onnx,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(path: str | Path) -> BundleMeta:
    """Parse and validate ``bundle.json`` without touching the weights."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (no such directory)")
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a bundle ({META_FILE} is missing)")
    try:
        raw = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_file}: corrupt JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{meta_file}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{meta_file}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        arch = raw["architecture"]
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
            raise BundleError(f"{meta_file}: 'architecture' needs a 'name'")
        meta = BundleMeta(
            task=raw["task"],
            architecture={"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})},
            preprocess=PreprocessSpec.from_dict(raw["preprocess"]),
            class_names=raw.get("class_names"),
            target=raw.get("target"),
            tta=check_tta(raw.get("tta")),
            faces=_check_faces(raw.get("faces")),
            metrics=raw.get("metrics") or {},
            training_config=raw.get("training_config") or {},
            augmentation=raw.get("augmentation"),
            versions=raw.get("versions") or {},
            weights_sha256=raw["weights_sha256"],
            onnx=_check_onnx(raw.get("onnx")),
            created=raw.get("created", ""),
            path=path,
        )
    except KeyError as e:
        raise BundleError(f"{meta_file}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{meta_file}: invalid field ({e})") from None
    check_architecture(meta.architecture["name"], meta.architecture["kwargs"], str(meta_file))
    if meta.task not in ("classification", "regression"):
        raise BundleError(f"{meta_file}: unknown task {meta.task!r}")
    if meta.task == "classification" and not meta.class_names:
        raise BundleError(f"{meta_file}: a classification bundle needs class_names")
    if meta.task == "regression" and not meta.target:
        raise BundleError(f"{meta_file}: a regression bundle needs a target")
    bins = (meta.target or {}).get("bins") if meta.task == "regression" else None
    if bins is not None and not (
        isinstance(bins, list) and len(bins) >= 2 and all(isinstance(b, (int, float)) for b in bins)
    ):
        raise BundleError(f"{meta_file}: target 'bins' must be a list of at least two numbers")
    return meta


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, BundleMeta]:
    """Rebuild the eval-mode module and its metadata from a bundle folder; ``BundleError`` if unusable
    (any of its files missing, or differing from the sha256 that ``bundle.json`` holds)."""
    return _load_module(path, device, check_onnx=True)


def _load_module(path: str | Path, device: str | torch.device, check_onnx: bool) -> tuple[nn.Module, BundleMeta]:
    import models  # noqa: F401  (registers every architecture)
    from models.registry import get_model

    meta = read_meta(path)
    weights = check_weights(path, meta)
    if meta.onnx and check_onnx:
        read_onnx(path, meta)  # a tampered model.onnx makes the whole bundle unusable, whichever runtime runs it
    name, kwargs = meta.architecture["name"], meta.architecture["kwargs"]
    try:
        model = get_model(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: cannot build architecture {name!r} with {kwargs}: {e}") from None
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BundleError(f"{weights}: weights do not match architecture {name!r}: {msg}") from None
    return model.to(device).eval(), meta


def check_weights(path: str | Path, meta: BundleMeta) -> Path:
    """The bundle's weights file, after checking it against the sha256 in ``bundle.json``; ``BundleError`` if not."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path}: not a bundle ({WEIGHTS_FILE} is missing)")
    if sha256_file(weights) != meta.weights_sha256:
        raise BundleError(f"{weights}: sha256 does not match bundle.json (corrupt or truncated weights)")
    return weights


def read_onnx(path: str | Path, meta: BundleMeta | None = None) -> bytes:
    """The bytes of the bundle's ``model.onnx``, checked against its sha256 in ``bundle.json``; ``BundleError`` if
    the bundle has none, or it is missing or differs. Hashes the very bytes it returns (no second read)."""
    meta = meta or read_meta(path)
    file = Path(path) / ONNX_FILE
    if not meta.onnx:
        raise BundleError(
            f"{path}: the bundle has no {ONNX_FILE} (add it with `python -m training.export --bundle {path} --onnx`)"
        )
    if not file.is_file():
        raise BundleError(f"{path}: {ONNX_FILE} is missing (bundle.json lists it)")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.onnx["sha256"]:
        raise BundleError(f"{file}: sha256 does not match bundle.json (tampered, corrupt or truncated graph)")
    return data


def add_onnx(path: str | Path) -> BundleMeta:
    """Write ``model.onnx`` into the existing bundle at ``path`` (replacing one that is there) and list it in
    ``bundle.json``; ``BundleError`` when the bundle does not load or the graph differs from the module."""
    path = Path(path)
    net, meta = _load_module(path, "cpu", check_onnx=False)  # the graph there, if any, is about to be replaced
    shape = (meta.preprocess.channels, *meta.preprocess.input_size)
    tmp_onnx = path / f".{ONNX_FILE}.tmp-{os.getpid()}"
    tmp_meta = path / f".{META_FILE}.tmp-{os.getpid()}"
    try:
        meta.onnx = _export(net, tmp_onnx, meta.task, meta.bins, meta.tta, shape)
        raw = json.loads((path / META_FILE).read_text())
        raw["onnx"] = meta.onnx
        tmp_meta.write_text(json.dumps(raw, indent=2) + "\n")
        os.replace(tmp_onnx, path / ONNX_FILE)  # an unlisted model.onnx is never read: this order is safe
        os.replace(tmp_meta, path / META_FILE)
    finally:
        tmp_onnx.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return meta
