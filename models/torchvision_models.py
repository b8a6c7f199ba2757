"""torchvision backbones under their torchvision names, wrapped in the Svertka model contract.

    >>> from models import get_model
    >>> net = get_model("resnet18", in_channels=1, num_outputs=10)                     # random init
    >>> net = get_model("resnet18", num_outputs=10, weights="ResNet18_Weights.DEFAULT")  # downloads once
    >>> net = get_model("resnet18", num_outputs=10, weights="resnet18.safetensors")      # local file

The wrapper (``TorchvisionNet``) keeps the torchvision model as ``backbone`` with its last
``nn.Linear`` moved out to ``head`` (so ``forward_features`` gives the pre-logits features) and
its first conv adapted to ``in_channels`` (pretrained RGB kernels summed into one channel for
grey input, as timm does). ``weights`` is a torchvision weights name ("DEFAULT",
"IMAGENET1K_V1" or "ResNet18_Weights.IMAGENET1K_V1") or a local ``.safetensors`` / ``.pth``
file that holds either the plain torchvision state dict or this wrapper's state dict. Files are
never unpickled (safetensors, or ``torch.load(weights_only=True)``).

Pretrained inception_v3 runs with ``transform_input=False``: feed it images normalised with
mean = std = 0.5 (the range its weights were trained on), not the ImageNet mean/std.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.registry import register_model

if TYPE_CHECKING:  # torchvision is imported where it is used: it adds seconds to every start-up
    import torchvision

# name -> smallest square input side supported (tests/test_models.py runs every model at this size).
# ResNets, MobileNets and EfficientNet run on 28 px (Fashion-MNIST) and end on a 1x1 map; VGG's five
# 2x2 pools need 32; AlexNet's 11x11/4 stem and three 3x3/2 pools need 63; Inception-v3 needs 75.
MIN_INPUT_SIZE: dict[str, int] = {
    "resnet18": 28,
    "resnet34": 28,
    "resnet50": 28,
    "vgg11_bn": 32,
    "vgg16": 32,
    "alexnet": 63,
    "inception_v3": 75,
    "mobilenet_v3_small": 28,
    "mobilenet_v3_large": 28,
    "efficientnet_b0": 28,
}
DEFAULT_INPUT_SIZE: dict[str, int] = {"inception_v3": 299}  # the rest: 224


class WeightsError(ValueError):
    """Weights that cannot be resolved, downloaded, read or loaded into the requested model."""


class TorchvisionNet(nn.Module):
    """A torchvision classifier as ``backbone`` (last Linear replaced by Identity) + ``head``."""

    def __init__(self, arch: str, in_channels: int = 3, num_outputs: int = 1000, weights: str | None = None) -> None:
        super().__init__()
        self.arch, self.in_channels, self.num_outputs = arch, in_channels, num_outputs
        self.min_input_size = MIN_INPUT_SIZE[arch]
        self.default_input_size = DEFAULT_INPUT_SIZE.get(arch, 224)
        state, source = _read_weights(arch, weights) if weights else ({}, "")
        ours = any(k.startswith("backbone.") for k in state)  # a TorchvisionNet state dict
        pretrained = bool(state) and not ours
        if pretrained:  # a torchvision state dict: load it into the untouched torchvision model
            aux = any(k.startswith("AuxLogits.") for k in state)
            backbone = _build(arch, num_classes=1000, aux_logits=aux, init_weights=False)
            _load_backbone_state(backbone, state, in_channels, num_outputs, source)
        else:
            backbone = _build(arch, num_classes=num_outputs, aux_logits=False)
        _adapt_first_conv(backbone, in_channels, pretrained)
        head_name, head = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1]
        if arch == "inception_v3":  # the aux branch only serves training-time loss
            backbone.aux_logits, backbone.AuxLogits = False, None
        backbone.set_submodule(head_name, nn.Identity())
        if head.out_features != num_outputs:
            head = nn.Linear(head.in_features, num_outputs)
        self.backbone, self.head = backbone, head
        if ours:
            try:
                self.load_state_dict(state)
            except RuntimeError as e:
                raise WeightsError(
                    f"{source}: weights do not fit {arch} with in_channels={in_channels}, "
                    f"num_outputs={num_outputs}: {_first_line(e)}"
                ) from None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, C, H, W) -> (B, F) pre-logits features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, C, H, W) -> (B, num_outputs)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _build(arch: str, num_classes: int, aux_logits: bool, init_weights: bool = True) -> nn.Module:
    """The bare torchvision model (weights, if any, are loaded by us, never downloaded by torchvision)."""
    extra = {"aux_logits": aux_logits, "transform_input": False, "init_weights": init_weights}
    extra = extra if arch == "inception_v3" else {}
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)


def _resolve_torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """ "DEFAULT", "IMAGENET1K_V1" or "ResNet18_Weights.IMAGENET1K_V1" -> the weights enum of ``arch``."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if "." not in member and member in enum.__members__:
        return enum[member]
    known = ", ".join(["DEFAULT"] + [f"{enum.__name__}.{m}" for m in enum.__members__ if m != "DEFAULT"])
    raise WeightsError(f"Unknown weights {name!r} for {arch}: not a file and not one of {known}")


def _read_weights(arch: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a local file or torchvision's weights store, and where it came from."""
    path = Path(weights).expanduser()
    looks_like_file = path.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt") or "/" in weights
    if not path.is_file():
        if looks_like_file:
            raise WeightsError(f"weights file {weights!r} does not exist")
        enum = _resolve_torchvision_weights(arch, weights)
        try:  # cached under ~/.cache/torch/hub/checkpoints after the first download
            state = enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except Exception as e:  # URLError/OSError offline, RuntimeError on a bad hash, ...
            raise WeightsError(
                f"Could not download torchvision weights {enum} for {arch} ({_first_line(e)}); "
                f"offline, download {enum.url} elsewhere and pass the local file: weights=/path/to/file.pth"
            ) from None
        return state, str(enum)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refusing to unpickle non-tensor objects (only plain state dicts are loaded; "
            f"save with torch.save(model.state_dict()) or safetensors): {_first_line(e)}"
        ) from None
    except Exception as e:  # truncated / not a weights file
        raise WeightsError(f"{path}: cannot read weights ({_first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor)")
    return state, str(path)


def _load_backbone_state(
    backbone: nn.Module, state: dict[str, torch.Tensor], in_channels: int, num_outputs: int, source: str
) -> None:
    """Load a torchvision state dict; a classifier of another size than ours or ImageNet's is skipped."""
    first = next(n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d))
    w = state.get(f"{first}.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == in_channels != 3:  # saved from a model already adapted
        _adapt_first_conv(backbone, in_channels, pretrained=False)
    head_name, head = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1]
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    w = state.get(f"{head_name}.weight")
    if w is not None and w.shape == (num_outputs, head.in_features):  # a fine-tuned classifier of our size
        backbone.set_submodule(head_name, nn.Linear(head.in_features, num_outputs))
    own = backbone.state_dict()
    state = {k: v for k, v in state.items() if not (k in head_keys and k in own and v.shape != own[k].shape)}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"{source}: weights do not fit {type(backbone).__name__}: {_first_line(e)}") from None
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise WeightsError(
            f"{source}: weights do not fit torchvision {type(backbone).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _adapt_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """timm's ``adapt_input_conv``: sum RGB kernels for 1 channel, else repeat and rescale."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _adapt_first_conv(backbone: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Give the first conv ``in_channels`` inputs (pretrained kernels adapted, random ones resliced)."""
    name, conv = next((n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(_adapt_input_weight(conv.weight, in_channels))
        else:  # keep torchvision's init distribution (fan_out based, independent of in_channels)
            reps = math.ceil(in_channels / conv.in_channels)
            new.weight.copy_(conv.weight.repeat(1, reps, 1, 1)[:, :in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    backbone.set_submodule(name, new)


def _register(arch: str) -> None:
    def builder(in_channels: int = 3, num_outputs: int = 1000, weights: str | None = None) -> TorchvisionNet:
        return TorchvisionNet(arch, in_channels, num_outputs, weights)

    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = f"torchvision ``{arch}`` (min input {MIN_INPUT_SIZE[arch]} px) in the Svertka contract."
    register_model(arch)(builder)


for _arch in MIN_INPUT_SIZE:
    _register(_arch)
