"""Image files and bytes -> uint8 ``(H, W, C)`` arrays, with numpy and PIL only (no torch, no albumentations).

``data.preprocess`` re-exports everything here; processes that only decode (Ray's decoding tasks
in ``serving.batch_ray``) import this module and start without torch.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300x6300; anything larger is refused before decoding

# The formats Pillow may open: raster images, decoded in process. Not EPS (Pillow hands the file to a
# Ghostscript subprocess, with no timeout, when gs is installed: a PostScript loop would hold a decode
# thread for ever), nor the stubs that need a handler (WMF, FITS, GRIB, ...), nor rare formats no one
# sends (an attack surface for nothing). A JPEG with MPO data still opens (Pillow's JPEG plugin).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "JPEG2000",
                 "PPM", "TGA", "ICO", "PCX", "QOI")  # fmt: skip
# The file names a folder listing takes as images (training folders, the batch script's --input DIR):
# the photo formats above; a file of another name can still be listed in a CSV.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".ppm", ".pgm", ".pbm"}
)


class ImageError(ValueError):
    """An input that is not a usable image (not an image, truncated, too large, ...)."""


# Everything decoding bad bytes has been seen to raise: Pillow raises far more than OSError
# (ValueError "Decompressed data too large" from a zTXt/iTXt chunk, SyntaxError and struct.error
# from broken headers, EOFError, TypeError/KeyError/IndexError on odd modes and tags, MemoryError).
# Each becomes the one ImageError (a 400 in the service, an error row in the batch script).
# ``data.preprocess.DECODE_ERRORS`` adds OpenCV's cv2.error (not imported here: nothing here calls OpenCV).
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
)


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
                warnings.simplefilter("ignore", UserWarning)  # see decode_image
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            accepted = ", ".join(IMAGE_FORMATS)
            raise ImageError(f"{name}: not a recognized image file (accepted: {accepted})") from None
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
            # Pillow's notes on a file it decodes anyway ("Corrupt EXIF data", palette transparency) name no
            # file and would reach the batch script's console and the server log bare: the pixels are fine.
            warnings.simplefilter("ignore", UserWarning)
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


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bundle weights and graphs, the landmark model)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


T = TypeVar("T")


def read_or_error(read: Callable[..., T], *args: object, **kwargs: object) -> tuple[T | None, str | None]:
    """``read(*args, **kwargs)`` -> ``(its result, None)``, or ``(None, why)`` when the file is not a usable
    image or cannot be read: the one set of messages for a bad file, in training and in both batch engines."""
    try:
        return read(*args, **kwargs), None
    except ImageError as e:
        return None, str(e)
    except OSError as e:  # unreadable (permissions, a folder named like an image, ...)
        return None, f"cannot read file ({e.strerror or e})"
