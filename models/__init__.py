"""Plain ``nn.Module`` networks, their registry and the bundle format. Imports no Lightning."""

from models import classic, torchvision_models  # noqa: F401  (registers the models)
from models.registry import get_model, get_model_builder, list_models, register_model

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]
