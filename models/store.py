"""Bundles in BentoML's model store: save a bundle folder as a BentoML model, find it again by tag.

    >>> from models.store import save_bundle_to_bentoml, bundle_dir_for_tag
    >>> tag = save_bundle_to_bentoml("artifacts/quickstart", "quickstart")   # 'quickstart:<version>'
    >>> bundle_dir_for_tag("quickstart:latest")                             # a folder load_bundle reads

The store lives under ``$BENTOML_HOME`` (default ``~/bentoml``). The BentoML model holds the
bundle's files unchanged (``model.safetensors``, ``model.onnx``, ``bundle.json``), and its metadata
repeats the task, architecture, class names or target and metrics so that ``bentoml models get TAG``
shows them. ``bentoml`` is imported inside the functions: importing ``models`` stays light.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from models.bundle import META_FILE, ONNX_FILE, WEIGHTS_FILE, BundleError, read_meta


def save_bundle_to_bentoml(bundle_dir: str | Path, name: str, labels: dict[str, str] | None = None) -> str:
    """Copy the bundle at ``bundle_dir`` into BentoML's model store as ``name``; returns the new tag."""
    import bentoml

    meta = read_meta(bundle_dir)  # BundleError if it is not a bundle
    if not (Path(bundle_dir) / WEIGHTS_FILE).is_file():
        raise BundleError(f"{bundle_dir}: not a bundle ({WEIGHTS_FILE} is missing)")
    metadata = {
        "task": meta.task,
        "architecture": meta.architecture["name"],
        "class_names": meta.class_names or [],
        "target": meta.target or {},
        "metrics": meta.metrics,
        "input": meta.preprocess.to_dict(),
        "weights_sha256": meta.weights_sha256,
        "onnx_sha256": (meta.onnx or {}).get("sha256", ""),
    }
    labels = {"framework": "pytorch", "format": "svertka-bundle", "task": meta.task, **(labels or {})}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for file in (WEIGHTS_FILE, META_FILE) + ((ONNX_FILE,) if meta.onnx else ()):
            shutil.copy2(Path(bundle_dir) / file, Path(model.path) / file)
        if meta.faces:  # a face model: keep the landmark model with it, so `bentoml build` packs it too
            from data.faces import LANDMARKS_FILE, FaceStageError, landmarks_path

            # not here: serving then looks in the cache, and says so if it is missing there too
            with contextlib.suppress(FaceStageError):
                shutil.copy2(landmarks_path(bundle_dir), Path(model.path) / LANDMARKS_FILE)
    return str(model.tag)


def bundle_dir_for_tag(tag: str) -> Path:
    """The bundle folder inside BentoML's model store for ``tag`` (``name`` or ``name:version``)."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        path = Path(bentoml.models.get(tag).path)
    except BentoMLException as e:  # NotFound, or a malformed tag
        raise BundleError(f"no model {tag!r} in the BentoML model store ({e})") from None
    if not (path / META_FILE).is_file():
        raise BundleError(f"BentoML model {tag!r} holds no Svertka bundle ({META_FILE} is missing in {path})")
    return path
