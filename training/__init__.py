"""Svertka training: LightningModules, callbacks, the CLI (``python -m training``) and export.

    from training import ImageClassifier, AgeRegressor

The modules are imported on first access, so ``python -m training.export`` never imports Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AgeRegressor", "ImageClassifier", "ImageTask"]  # all in training.modules


def __getattr__(name: str) -> Any:
    if name in __all__:
        from training import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
