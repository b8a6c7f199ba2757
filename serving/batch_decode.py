"""The Ray engine's decoding tasks: files -> uint8 image arrays, importing numpy and PIL only.

``serving.batch_ray`` maps ``decode_files`` over the input rows in parallel Ray tasks; the
model actors apply the rest of the bundle's preprocessing and run the forward. Keeping torch and
albumentations out of this module keeps the decoding workers' start-up short.

For a face bundle (its ``faces`` entry: a ``data.faces.FaceAligner``, numpy + dlib) the task
detects and aligns each face on the full-resolution decoded image (boxes in the original image's
pixels) and ships the chips. Otherwise an image larger than ``RESIZE_ABOVE`` pixels is resized
here, with the bundle's own resize (which imports albumentations and torch, once per worker, only
when such an image shows up), so large photos do not travel to the actors at full size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from data.imagefile import load_image, read_or_error

if TYPE_CHECKING:
    from data.faces import FaceAligner

RESIZE_ABOVE = 1_000_000  # pixels: larger images are resized in the decoding task (never before face detection)
_resizers: dict[str, Any] = {}  # this worker's resize transforms, by spec


def resize(image: np.ndarray, spec: dict) -> np.ndarray:
    """The geometric part of the bundle's eval preprocessing: uint8 ``(H, W, C)`` -> ``(h, w, C)``."""
    key = repr(sorted(spec.items()))
    if key not in _resizers:
        import albumentations as A

        from data.preprocess import PreprocessSpec, resize_ops

        _resizers[key] = A.Compose(resize_ops(PreprocessSpec.from_dict(spec)))
    return _resizers[key](image=image)["image"]


def decode_one(
    file: str,
    spec: dict,
    max_pixels: int | None,
    aligner: FaceAligner | None = None,
    max_faces: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One file -> ``(images, box, score, resized)``; ``ImageError``/``OSError`` if unusable.

    ``images`` uint8 ``(K, H, W, C)``: the face chips (K faces, 0 if none) with an ``aligner``,
    else the whole image (K = 1, box the whole image, score NaN), resized if over ``RESIZE_ABOVE``.
    """
    channels = int(spec["channels"])
    image = load_image(file, channels=channels, max_pixels=max_pixels)
    h, w = image.shape[:2]
    if aligner is not None:
        found = aligner(image, max_faces=max_faces)
        chips = [f.chip for f in found]
        images = np.stack(chips) if chips else np.zeros((0, 0, 0, channels), np.uint8)
        box = np.asarray([f.box for f in found], np.int64).reshape(-1, 4)
        score = np.asarray([np.nan if f.score is None else f.score for f in found], np.float64)
        return images, box, score, False
    big = h * w > RESIZE_ABOVE
    image = resize(image, spec) if big else image
    return image[None], np.asarray([[0, 0, w, h]], np.int64), np.full(1, np.nan), big


def decode_files(
    batch: dict[str, np.ndarray],
    spec: dict,
    max_pixels: int | None,
    aligner: FaceAligner | None = None,
    max_faces: int | None = None,
) -> dict[str, np.ndarray]:
    """A Ray task: ``file`` paths -> per file ``images`` (see ``decode_one``), ``box``, ``score``, ``resized``,
    ``error``. A bad file has 0 images and its ``error`` ('' if ok); a photo without a face has 0 images and no error.
    """
    channels = int(spec["channels"])
    images, boxes, scores, resized, errors = [], [], [], [], []
    for file in batch["file"]:
        decoded, err = read_or_error(decode_one, str(file), spec, max_pixels, aligner, max_faces)
        if decoded is None:
            decoded = np.zeros((0, 0, 0, channels), np.uint8), np.zeros((0, 4), np.int64), np.zeros(0), False
        x, box, score, big = decoded
        images.append(x)
        boxes.append(box)
        scores.append(score)
        resized.append(big)
        errors.append(err or "")
    return {
        "path": batch["path"],
        "images": ragged(images),
        "box": ragged(boxes),
        "score": ragged(scores),
        "resized": np.asarray(resized, dtype=bool),
        "error": np.asarray(errors, dtype=object),
    }


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """One array per file (their shapes differ) as an object column Ray Data can carry."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column
