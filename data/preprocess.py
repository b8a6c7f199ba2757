"""Eval preprocessing shared by training, the bundle, the HTTP service and the batch script.

One ``PreprocessSpec`` (input size, channels, mean/std, resize policy) is recorded in every
bundle; ``load_image`` turns bytes or a file into a uint8 ``(H, W, C)`` array the way serving
and the data sets both do (EXIF orientation applied, any PIL mode converted), and
``eval_transform`` turns that array into the normalized ``(C, H, W)`` float tensor.

This module imports neither Lightning nor ``training``: serving depends on it.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image

ResizePolicy = Literal["stretch", "center_crop"]
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300x6300; anything larger is refused before decoding


class ImageError(ValueError):
    """An input that is not a usable image (not an image, truncated, too large, ...)."""


# Everything decoding bad bytes has been seen to raise: Pillow raises far more than OSError
# (ValueError "Decompressed data too large" from a zTXt/iTXt chunk, SyntaxError and struct.error
# from broken headers, EOFError, TypeError/KeyError/IndexError on odd modes and tags, MemoryError),
# OpenCV raises cv2.error. Each becomes the one ImageError (a 400 in the service, an error row in
# the batch script).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    TypeError,
    KeyError,
    IndexError,
    ZeroDivisionError,
    MemoryError,
    cv2.error,
)


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects: ``input_size`` is (height, width); mean/std are per channel in [0, 1]."""

    input_size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: ResizePolicy = "stretch"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError(f"resize must be 'stretch' or 'center_crop', got {self.resize!r}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: d[k] for k in ("input_size", "channels", "mean", "std", "resize", "extra") if k in d}
        return cls(**known)


def resize_ops(spec: PreprocessSpec) -> list[A.BasicTransform]:
    """The geometric part of eval preprocessing (also the first step of training pipelines)."""
    h, w = spec.input_size
    if spec.resize == "center_crop":
        return [A.SmallestMaxSize(max_size=max(h, w)), A.CenterCrop(height=h, width=w)]
    return [A.Resize(height=h, width=w)]


def normalize_ops(spec: PreprocessSpec) -> list[A.BasicTransform]:
    """Normalize then ToTensorV2 (in that order: Normalize works on HWC arrays)."""
    return [A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0), ToTensorV2()]


def eval_transform(spec: PreprocessSpec) -> A.Compose:
    """uint8 ``(H, W, C)`` array -> float ``(C, h, w)`` tensor, as recorded in the bundle."""
    return A.Compose([*resize_ops(spec), *normalize_ops(spec)])


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Make a uint8 image array ``(H, W, channels)``: gray <-> RGB, alpha dropped."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageError(f"expected an image array of 2 or 3 dimensions, got shape {arr.shape}")
    c = arr.shape[2]
    if c == 4:  # RGBA
        arr, c = arr[:, :, :3], 3
    elif c == 2:  # LA
        arr, c = arr[:, :, :1], 1
    if c == channels:
        return np.ascontiguousarray(arr)
    if channels == 3 and c == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if channels == 1 and c == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        gray = arr[:, :, 0] * 0.299 + arr[:, :, 1] * 0.587 + arr[:, :, 2] * 0.114
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    raise ImageError(f"cannot convert an image with {c} channels to {channels}")


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Any PIL mode (1, L, LA, P, RGB, RGBA, CMYK, I;16, I, F, ...) -> uint8 ``(H, W, channels)``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
    elif mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        arr = np.clip(arr / 256.0 if hi > 255 else arr, 0, 255).astype(np.uint8)
    else:
        target = "L" if channels == 1 and mode in ("1", "L", "LA") else "RGB"
        if mode == "P" and channels == 1:
            target = "L"
        arr = np.asarray(img.convert(target))
    return to_channels(arr, channels)


def open_image(src: bytes | str | Path | Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``src`` and read its header only: the pixels are not decoded yet (see ``decode_image``).

    The pixel count is checked here, from the header, so a decompression bomb costs nothing;
    ``img.width * img.height`` tells a caller how much work ``decode_image`` will be.
    """
    if isinstance(src, Image.Image):
        img, name = src, "image"
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise ImageError("empty file: no image data")
            fp, name = io.BytesIO(bytes(src)), "upload"
        else:
            fp, name = str(src), str(src)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognized image file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: image has too many pixels") from None
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except DECODE_ERRORS as e:  # e.g. a text chunk that inflates past Pillow's limit (ValueError)
            raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has zero width or height")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    return img


def decode_image(img: Image.Image, channels: int) -> np.ndarray:
    """An opened image -> uint8 ``(H, W, channels)``: decode, EXIF transpose, convert; ``ImageError`` if bad."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return pil_to_array(ImageOps.exif_transpose(img), channels)
    except Image.DecompressionBombError:
        raise ImageError("image has too many pixels") from None
    except MemoryError:
        raise ImageError(f"image of {img.width}x{img.height} pixels does not fit in memory") from None
    except DECODE_ERRORS as e:  # truncated or corrupt data, a mode it cannot convert, ...
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def load_image(
    src: bytes | str | Path | Image.Image, channels: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode ``src`` into a uint8 ``(H, W, channels)`` array; ``ImageError`` on bad input."""
    img = open_image(src, max_pixels=max_pixels)
    try:
        return decode_image(img, channels)
    finally:
        if img is not src:
            img.close()  # the file handle of a path, at once


def preprocess(arr: np.ndarray, spec: PreprocessSpec, transform: A.Compose | None = None) -> torch.Tensor:
    """uint8 ``(H, W, C)`` array -> float ``(C, h, w)`` tensor, ready for the model."""
    transform = transform or eval_transform(spec)
    return transform(image=to_channels(arr, spec.channels))["image"].float()
