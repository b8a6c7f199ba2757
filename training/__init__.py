"""Svertka training: LightningModules, callbacks, the CLI (``python -m training``) and export.

    from training import ImageClassifier, AgeRegressor

The modules are imported on first access, so ``python -m training.export`` never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ImageTask": "training.modules", "ImageClassifier": "training.modules", "AgeRegressor": "training.modules"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
