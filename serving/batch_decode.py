"""The Ray engine's decoding tasks: files -> uint8 image arrays, importing numpy and PIL only.

``serving.batch_ray`` maps ``decode_files`` over the input rows in parallel Ray tasks; the
model actors apply the bundle's preprocessing (resize, normalize) and run the forward. Keeping
torch and albumentations out of this module keeps the decoding workers' start-up short.
"""

from __future__ import annotations

import numpy as np

from data.imagefile import ImageError, load_image


def decode_files(batch: dict[str, np.ndarray], channels: int, max_pixels: int | None) -> dict[str, np.ndarray]:
    """A Ray task: ``file`` paths -> ``image`` (uint8 ``(H, W, C)`` each, empty if bad) and ``error`` ('' if ok)."""
    images, errors = [], []
    for file in batch["file"]:
        try:
            images.append(load_image(str(file), channels=channels, max_pixels=max_pixels))
            errors.append("")
        except ImageError as e:  # the messages of serving.batch.load_one
            images.append(np.zeros((0, 0, channels), np.uint8))
            errors.append(str(e))
        except OSError as e:  # unreadable (permissions, a folder named like an image, ...)
            images.append(np.zeros((0, 0, channels), np.uint8))
            errors.append(f"cannot read file ({e.strerror or e})")
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {"path": batch["path"], "image": column, "error": np.asarray(errors, dtype=object)}
