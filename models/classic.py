"""The classic CNN line, sized for 28-128 px inputs: LeNet-5 -> small 3-conv CNN -> AlexNet -> VGG -> Inception.

Every model takes ``in_channels`` and ``num_outputs`` (classes, or 1 for a regressor) and has
``forward_features`` (image -> pooled/flattened features), a replaceable ``head`` (the last
``nn.Linear``) and the class attributes ``min_input_size`` / ``default_input_size`` (square side
in pixels) that data configs and tests use to pick a valid size.

    >>> from models import get_model
    >>> net = get_model("vgg_small_bn", in_channels=1, num_outputs=10)
    >>> net(torch.zeros(2, 1, 28, 28)).shape   # torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from models.registry import register_model

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: str | None) -> nn.Module:
    """``nn.Identity`` for ``None``, else the named activation; ``ValueError`` listing the known names."""
    if name is None:
        return nn.Identity()
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)} or None") from None


@register_model("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv5x5x6, pool, conv5x5x16, pool, FC120, FC84, output.

    tanh activations and average pooling (the paper's subsampling layers); C3 is fully connected
    to S2 and the RBF output layer is a plain linear ``head``. 28x28 input is zero-padded by 2 to
    the paper's 32x32; 32x32 is used as is; any other size is resized to 32x32. ``input_size`` is
    accepted for a uniform signature with ``simple_cnn`` and does not change the network.
    """

    min_input_size = 28
    default_input_size = 32

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
        return self.features(x)  # (B, C, 32, 32) -> (B, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)


@register_model("simple_cnn")
class SimpleCNN(nn.Module):
    """The 3-conv CNN of the Fashion-MNIST practical (60,874 parameters for 1x28x28 and 10 classes).

    Conv 16, 32, 64 (3x3, 'same'), each followed by 2x2 max pooling, Flatten, Dense 64 + ELU,
    Dense ``num_outputs``. As in the original Keras model the convolutions have no activation
    unless ``conv_activation`` names one ("relu", "elu", ...); ``batch_norm`` adds BatchNorm after
    each conv. The flatten size depends on ``input_size`` (square side the model is built for).
    """

    min_input_size = 8  # three 2x2 pools need >= 8 px to leave a 1x1 map
    default_input_size = 28

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 10,
        input_size: int = 28,
        conv_activation: str | None = None,
        batch_norm: bool = False,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if input_size < self.min_input_size:
            raise ValueError(f"simple_cnn needs input_size >= {self.min_input_size}, got {input_size}")
        self.in_channels, self.num_outputs, self.input_size = in_channels, num_outputs, input_size
        layers: list[nn.Module] = []
        c = in_channels
        for width in (16, 32, 64):
            layers.append(nn.Conv2d(c, width, 3, padding="same"))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [_activation(conv_activation), nn.MaxPool2d(2)]  # H -> H // 2
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, C, 28, 28) -> (B, 64 * 3 * 3)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, input_size, input_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ELU())
        self.head = nn.Linear(hidden, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"simple_cnn was built for {self.input_size}x{self.input_size} input, got "
                f"{tuple(x.shape[-2:])}; build it with input_size={x.shape[-1]} or resize the images"
            )
        return self.fc(self.features(x))  # (B, C, H, W) -> (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)


@register_model("alexnet_small")
class AlexNetSmall(nn.Module):
    """AlexNet (Krizhevsky et al. 2012) scaled down for 28-128 px: 5 convs + ReLU, 3 max pools, dropout FCs.

    The 11x11/stride-4 first layer becomes 5x5/stride-1 (small inputs), widths are roughly halved,
    local response normalisation is left out (as torchvision does), and an adaptive average pool
    makes the classifier independent of the input size.
    """

    min_input_size = 28
    default_input_size = 64

    def __init__(self, in_channels: int = 3, num_outputs: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 48, 5, padding=2),  # (B, C, H, W) -> (B, 48, H, W)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),  # -> (B, 48, H/2, W/2)
            nn.Conv2d(48, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),  # -> (B, 128, H/4, W/4)
            nn.Conv2d(128, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),  # -> (B, 128, H/8, W/8)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(3)  # -> (B, 128, 3, 3)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(128 * 3 * 3, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(512, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))  # (B, C, H, W) -> (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)


VGG_CFGS: dict[str, list[int | str]] = {
    # three VGG stages of two 3x3 convs each ("M" = 2x2 max pool): 28 -> 14 -> 7 -> 3
    "small": [32, 32, "M", 64, 64, "M", 128, 128, "M"],
}


def make_layers(cfg: list[int | str], batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
    """torchvision's VGG builder: ints are 3x3 conv widths (+BN) + ReLU, "M" is a 2x2 max pool."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
            continue
        v = int(v)
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGGSmall(nn.Module):
    """VGG (Simonyan & Zisserman 2014) for small inputs: a cfg of 3x3 conv stacks, adaptive pool, 2 FCs."""

    min_input_size = 28
    default_input_size = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_outputs: int = 10,
        cfg: list[int | str] | None = None,
        batch_norm: bool = False,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        cfg = list(cfg or VGG_CFGS["small"])
        widths = [v for v in cfg if v != "M"]
        if not widths:
            raise ValueError(f"VGG cfg needs at least one conv width, got {cfg}")
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.features = make_layers(cfg, batch_norm, in_channels)  # (B, C, H, W) -> (B, 128, H/8, W/8)
        self.avgpool = nn.AdaptiveAvgPool2d(3)  # -> (B, 128, 3, 3)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(widths[-1]) * 3 * 3, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, num_outputs)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))  # (B, C, H, W) -> (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)


@register_model("vgg_small")
def vgg_small(
    in_channels: int = 3, num_outputs: int = 10, cfg: list[int | str] | None = None, dropout: float = 0.5
) -> VGGSmall:
    """VGG-style net without BatchNorm; ``cfg`` defaults to ``VGG_CFGS["small"]``."""
    return VGGSmall(in_channels, num_outputs, cfg, batch_norm=False, dropout=dropout)


@register_model("vgg_small_bn")
def vgg_small_bn(
    in_channels: int = 3, num_outputs: int = 10, cfg: list[int | str] | None = None, dropout: float = 0.5
) -> VGGSmall:
    """VGG-style net with BatchNorm after every conv; ``cfg`` defaults to ``VGG_CFGS["small"]``."""
    return VGGSmall(in_channels, num_outputs, cfg, batch_norm=True, dropout=dropout)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU, the unit of every Inception-v3 branch."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """Fig. 5 of Szegedy et al. 2016: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 (the factorised 5x5) | avgpool->1x1."""

    def __init__(self, in_channels: int, width: int = 32, reduce: int = 24) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, width, kernel_size=1)
        self.branch3x3 = nn.Sequential(
            BasicConv2d(in_channels, reduce, kernel_size=1),
            BasicConv2d(reduce, width, kernel_size=3, padding=1),
        )
        self.branch3x3dbl = nn.Sequential(
            BasicConv2d(in_channels, reduce, kernel_size=1),
            BasicConv2d(reduce, width, kernel_size=3, padding=1),
            BasicConv2d(width, width, kernel_size=3, padding=1),
        )
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1), BasicConv2d(in_channels, width, kernel_size=1)
        )
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch3x3dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)  # (B, C, H, W) -> (B, 4 * width, H, W)


class ReductionA(nn.Module):
    """Grid reduction without a representational bottleneck (Fig. 10): stride-2 conv branches || max pool."""

    def __init__(self, in_channels: int, width: int = 64, reduce: int = 48) -> None:
        super().__init__()
        self.branch3x3 = nn.Sequential(
            BasicConv2d(in_channels, reduce, kernel_size=1),
            BasicConv2d(reduce, width, kernel_size=3, stride=2, padding=1),
        )
        self.branch3x3dbl = nn.Sequential(
            BasicConv2d(in_channels, reduce // 2, kernel_size=1),
            BasicConv2d(reduce // 2, reduce, kernel_size=3, padding=1),
            BasicConv2d(reduce, reduce, kernel_size=3, stride=2, padding=1),
        )
        self.branch_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = width + reduce + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch3x3, self.branch3x3dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)  # (B, C, H, W) -> (B, out, ceil(H/2), ceil(W/2))


class InceptionC(nn.Module):
    """Fig. 6: n x n convolutions factorised into 1xn then nx1 (single and double), plus 1x1 and pool branches."""

    def __init__(self, in_channels: int, width: int = 64, reduce: int = 48, n: int = 3) -> None:
        super().__init__()
        p = n // 2
        self.branch1x1 = BasicConv2d(in_channels, width, kernel_size=1)
        self.branch_nxn = nn.Sequential(
            BasicConv2d(in_channels, reduce, kernel_size=1),
            BasicConv2d(reduce, reduce, kernel_size=(1, n), padding=(0, p)),
            BasicConv2d(reduce, width, kernel_size=(n, 1), padding=(p, 0)),
        )
        self.branch_nxn_dbl = nn.Sequential(
            BasicConv2d(in_channels, reduce, kernel_size=1),
            BasicConv2d(reduce, reduce, kernel_size=(n, 1), padding=(p, 0)),
            BasicConv2d(reduce, reduce, kernel_size=(1, n), padding=(0, p)),
            BasicConv2d(reduce, reduce, kernel_size=(n, 1), padding=(p, 0)),
            BasicConv2d(reduce, width, kernel_size=(1, n), padding=(0, p)),
        )
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1), BasicConv2d(in_channels, width, kernel_size=1)
        )
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch_nxn, self.branch_nxn_dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], 1)  # (B, C, H, W) -> (B, 4 * width, H, W)


@register_model("inception_small")
class InceptionSmall(nn.Module):
    """Inception-v3 ideas (Szegedy et al. 2016) at 28-128 px: ~0.22M params, ~42 MFLOPs at 28x28.

    stem (two BasicConv2d around a stride-2 max pool) -> InceptionA (5x5 as two 3x3) -> grid
    reduction -> InceptionC (factorised 1xn/nx1, ``n`` = 3 suits a 7x7 grid, 7 as in the paper's
    17x17 stage) -> global average pool -> dropout -> ``head``. BatchNorm after every conv; the
    auxiliary classifier and label smoothing (a loss choice) are left out.
    """

    min_input_size = 28
    default_input_size = 32

    def __init__(self, in_channels: int = 3, num_outputs: int = 10, n: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        if n < 1 or n % 2 == 0:
            raise ValueError(f"inception_small needs an odd n (3 or 7), got {n}")
        self.in_channels, self.num_outputs = in_channels, num_outputs
        self.stem = nn.Sequential(
            BasicConv2d(in_channels, 32, kernel_size=3, padding=1),  # (B, C, 28, 28) -> (B, 32, 28, 28)
            nn.MaxPool2d(3, stride=2, padding=1),  # -> (B, 32, 14, 14)
            BasicConv2d(32, 64, kernel_size=3, padding=1),  # -> (B, 64, 14, 14)
        )
        block_a = InceptionA(64, width=32, reduce=24)  # -> (B, 128, 14, 14)
        reduction = ReductionA(block_a.out_channels, width=64, reduce=48)  # -> (B, 240, 7, 7)
        block_c = InceptionC(reduction.out_channels, width=64, reduce=48, n=n)  # -> (B, 256, 7, 7)
        self.blocks = nn.Sequential(block_a, reduction, block_c)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))  # -> (B, 256)
        self.head = nn.Linear(block_c.out_channels, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))  # (B, C, H, W) -> (B, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)
