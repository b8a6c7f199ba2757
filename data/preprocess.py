"""Eval preprocessing shared by training, the bundle, the HTTP service and the batch script.

One ``PreprocessSpec`` (input size, channels, mean/std, resize policy) is recorded in every
bundle; ``load_image`` turns bytes or a file into a uint8 ``(H, W, C)`` array the way serving
and the data sets both do (EXIF orientation applied, any PIL mode converted), and
``eval_transform`` turns that array into the normalized ``(C, H, W)`` float tensor.

This module imports neither Lightning nor ``training``: serving depends on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from data.imagefile import DECODE_ERRORS as _FILE_DECODE_ERRORS
from data.imagefile import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS
from data.imagefile import ImageError as ImageError
from data.imagefile import decode_image as decode_image
from data.imagefile import load_image as load_image
from data.imagefile import open_image as open_image
from data.imagefile import pil_to_array as pil_to_array
from data.imagefile import to_channels

ResizePolicy = Literal["stretch", "center_crop"]


# Every exception decoding bad bytes raises (``data.imagefile.DECODE_ERRORS``) and OpenCV's cv2.error:
# each becomes the one ImageError.
DECODE_ERRORS: tuple[type[BaseException], ...] = (*_FILE_DECODE_ERRORS, cv2.error)


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


def preprocess(arr: np.ndarray, spec: PreprocessSpec, transform: A.Compose | None = None) -> torch.Tensor:
    """uint8 ``(H, W, C)`` array -> float ``(C, h, w)`` tensor, ready for the model."""
    transform = transform or eval_transform(spec)
    return transform(image=to_channels(arr, spec.channels))["image"].float()
