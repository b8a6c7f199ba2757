"""Model registry in the torchvision manner: ``register_model``, ``get_model``, ``list_models``.

>>> from models import get_model, list_models
>>> net = get_model("lenet5", in_channels=1, num_outputs=10)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model builder (class or function) under ``name``."""

    def wrapper(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__.lower()
        if key in _MODELS:
            raise ValueError(f"A model named {key!r} is already registered")
        _MODELS[key] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(list_models())}") from None


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered under ``name`` with ``kwargs`` (``in_channels``, ``num_outputs``, ...)."""
    return get_model_builder(name)(**kwargs)
