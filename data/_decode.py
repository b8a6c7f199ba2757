"""Worker side of the decode cache: kept free of Lightning so spawned pool workers start fast."""

from __future__ import annotations

import albumentations as A
import numpy as np

from data.imagefile import load_image, read_or_error
from data.preprocess import PreprocessSpec, resize_ops

_resize: A.Compose | None = None
_spec: PreprocessSpec | None = None


def init_worker(spec: PreprocessSpec) -> None:
    global _resize, _spec
    import cv2

    cv2.setNumThreads(1)
    _spec, _resize = spec, A.Compose(resize_ops(spec))


def decode(path: str) -> tuple[np.ndarray | None, str | None]:
    """One file -> (uint8 (h, w, C) at input size, None) or (None, error message)."""
    img, err = read_or_error(load_image, path, channels=_spec.channels)
    if img is None:
        return None, err
    out = _resize(image=img)["image"]
    return out.reshape(*_spec.input_size, _spec.channels), None
