"""The classic CNN line, sized for 28-128 px inputs: LeNet-5 -> small 3-conv CNN -> AlexNet -> VGG -> Inception.

Every model takes ``in_channels`` and ``num_outputs`` (classes, or 1 for a regressor) and has
``forward_features`` (image -> pooled/flattened features) and a replaceable ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registry import register_model


@register_model("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv5x5x6, pool, conv5x5x16, pool, FC120, FC84, output.

    28x28 input is zero-padded by 2 to the paper's 32x32; 32x32 input is used as is.
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 10, input_size: int = 32) -> None:
        super().__init__()
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),  # (B, C, 32, 32) -> (B, 6, 28, 28)
            nn.Tanh(),
            nn.AvgPool2d(2),  # -> (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5),  # -> (B, 16, 10, 10)
            nn.Tanh(),
            nn.AvgPool2d(2),  # -> (B, 16, 5, 5)
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
        )
        self.head = nn.Linear(84, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (28, 28):
            x = nn.functional.pad(x, (2, 2, 2, 2))
        elif (h, w) != (32, 32):
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.features(x)  # (B, C, H, W) -> (B, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)
