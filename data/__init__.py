"""Svertka data: Lightning data modules (loaded lazily) and the shared eval preprocessing.

Importing ``data`` or ``data.preprocess`` never imports Lightning (serving relies on that);
``data.DigitsDataModule`` and friends are imported on first access, so YAML configs may say
``class_path: data.DigitsDataModule`` or ``class_path: data.digits.DigitsDataModule``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network look-up for a newer version at import

_LAZY = {
    "ImageDataModule": "data.base",
    "Augment": "data.augment",
    "DataError": "data.base",
    "MissingDataError": "data.base",
    "DigitsDataModule": "data.digits",
    "MNISTDataModule": "data.mnist",
    "FashionMNISTDataModule": "data.mnist",
    "ImageFolderDataModule": "data.folder",
    "CSVDataModule": "data.folder",
    "UTKFaceDataModule": "data.utkface",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
