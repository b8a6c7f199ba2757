"""torchvision backbones (filled in by the models work)."""
