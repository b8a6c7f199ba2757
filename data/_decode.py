"""Worker side of the decode cache: kept free of Lightning so spawned pool workers start fast."""

from __future__ import annotations

import albumentations as A
import numpy as np

from data.preprocess import ImageError, PreprocessSpec, load_image, resize_ops

_resize: A.Compose | None = None
_spec: PreprocessSpec | None = None


def init_worker(spec: PreprocessSpec) -> None:
    global _resize, _spec
    import cv2

    cv2.setNumThreads(1)
    _spec, _resize = spec, A.Compose(resize_ops(spec))


def decode(path: str) -> tuple[np.ndarray | None, str | None]:
    """One file -> (uint8 (h, w, C) at input size, None) or (None, error message)."""
    try:
        img = load_image(path, channels=_spec.channels)
    except ImageError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot read ({e})"
    out = _resize(image=img)["image"]
    return out.reshape(*_spec.input_size, _spec.channels), None
