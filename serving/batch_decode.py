"""The Ray engine's decoding tasks: files -> uint8 image arrays, importing numpy and PIL only.

``serving.batch_ray`` maps ``decode_files`` over the input rows in parallel Ray tasks; the
model actors apply the rest of the bundle's preprocessing and run the forward. Keeping torch and
albumentations out of this module keeps the decoding workers' start-up short. An image larger
than ``RESIZE_ABOVE`` pixels is resized here, with the bundle's own resize (which imports
albumentations and torch, once per worker, only when such an image shows up), so large photos
do not travel to the actors at full size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.imagefile import ImageError, load_image

RESIZE_ABOVE = 1_000_000  # pixels: larger images are resized in the decoding task
_resizers: dict[str, Any] = {}  # this worker's resize transforms, by spec


def resize(image: np.ndarray, spec: dict) -> np.ndarray:
    """The geometric part of the bundle's eval preprocessing: uint8 ``(H, W, C)`` -> ``(h, w, C)``."""
    key = repr(sorted(spec.items()))
    if key not in _resizers:
        import albumentations as A

        from data.preprocess import PreprocessSpec, resize_ops

        _resizers[key] = A.Compose(resize_ops(PreprocessSpec.from_dict(spec)))
    return _resizers[key](image=image)["image"]


def decode_files(batch: dict[str, np.ndarray], spec: dict, max_pixels: int | None) -> dict[str, np.ndarray]:
    """A Ray task: ``file`` paths -> ``image`` (uint8 ``(H, W, C)``; empty if bad), ``resized``, ``error``."""
    channels = int(spec["channels"])
    images, resized, errors = [], [], []
    for file in batch["file"]:
        try:
            image = load_image(str(file), channels=channels, max_pixels=max_pixels)
            big = image.shape[0] * image.shape[1] > RESIZE_ABOVE
            images.append(resize(image, spec) if big else image)
            resized.append(big)
            errors.append("")
        except ImageError as e:  # the messages of serving.batch.load_one
            images.append(np.zeros((0, 0, channels), np.uint8))
            resized.append(False)
            errors.append(str(e))
        except OSError as e:  # unreadable (permissions, a folder named like an image, ...)
            images.append(np.zeros((0, 0, channels), np.uint8))
            resized.append(False)
            errors.append(f"cannot read file ({e.strerror or e})")
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {
        "path": batch["path"],
        "image": column,
        "resized": np.asarray(resized, dtype=bool),
        "error": np.asarray(errors, dtype=object),
    }
