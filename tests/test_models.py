"""The model contract over the whole registry, the classic line's specifics, and torchvision weights.

OMP_NUM_THREADS=2 .venv/bin/pytest tests/test_models.py -q
"""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import models
from models import get_model, get_model_builder, list_models, register_model
from models.torchvision_models import WeightsError

CLASSIC = [n for n in list_models() if get_model_builder(n).__module__ == "models.classic"]
TORCHVISION = [n for n in list_models() if n not in CLASSIC]
GRAD_CHECKED_TORCHVISION = ["resnet18", "mobilenet_v3_small"]  # the rest: forward + shape (they are big)


def _size(net: nn.Module) -> int:
    return max(28, net.min_input_size)


def _check_forward_backward(net: nn.Module, in_channels: int, num_outputs: int) -> None:
    s = _size(net)
    net.train()
    y = net(torch.randn(2, in_channels, s, s))
    assert y.shape == (2, num_outputs)
    assert torch.isfinite(y).all()
    feats = net.forward_features(torch.randn(2, in_channels, s, s))
    assert feats.ndim == 2 and feats.shape[0] == 2 and feats.shape[1] == net.head.in_features
    y.square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def test_registry_holds_the_classic_line_and_torchvision_backbones() -> None:
    assert {"lenet5", "simple_cnn", "alexnet_small", "vgg_small", "vgg_small_bn", "inception_small"} <= set(CLASSIC)
    expected = {"resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16", "alexnet", "inception_v3"}
    expected |= {"mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"}
    assert expected <= set(TORCHVISION)


@pytest.mark.parametrize("num_outputs", [10, 1])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", CLASSIC + GRAD_CHECKED_TORCHVISION)
def test_contract_forward_backward(name: str, in_channels: int, num_outputs: int) -> None:
    net = get_model(name, in_channels=in_channels, num_outputs=num_outputs)
    assert (net.in_channels, net.num_outputs) == (in_channels, num_outputs)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == num_outputs
    _check_forward_backward(net, in_channels, num_outputs)


@pytest.mark.slow
@pytest.mark.parametrize("num_outputs", [10, 1])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", [n for n in TORCHVISION if n not in GRAD_CHECKED_TORCHVISION])
def test_contract_forward_backward_big_torchvision(name: str, in_channels: int, num_outputs: int) -> None:
    """The same contract for the big backbones (slow: vgg16 alone holds 134M parameters)."""
    test_contract_forward_backward(name, in_channels, num_outputs)


@pytest.mark.parametrize("name", [n for n in TORCHVISION if n not in GRAD_CHECKED_TORCHVISION])
def test_torchvision_forward_shape(name: str) -> None:
    net = get_model(name, in_channels=1, num_outputs=3).eval()
    s = net.min_input_size
    with torch.no_grad():
        y = net(torch.randn(2, 1, s, s))
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    assert net.head.out_features == 3 and net.default_input_size >= s


def test_head_is_replaceable() -> None:
    net = get_model("vgg_small_bn", in_channels=1, num_outputs=10)
    net.head = nn.Linear(net.head.in_features, 4)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_simple_cnn_matches_the_practical() -> None:
    net = get_model("simple_cnn", in_channels=1, num_outputs=10)
    assert sum(p.numel() for p in net.parameters()) == 60_874
    assert not any(isinstance(m, nn.ReLU) for m in net.features)  # no conv activation by default
    assert isinstance(net.fc[1], nn.ELU)
    relu = get_model("simple_cnn", conv_activation="relu", batch_norm=True)
    assert sum(isinstance(m, nn.ReLU) for m in relu.features) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in relu.features) == 3
    big = get_model("simple_cnn", in_channels=3, input_size=64)
    assert big(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size=32"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="Unknown activation 'nope'"):
        get_model("simple_cnn", conv_activation="nope")


def test_lenet5_takes_28_and_32() -> None:
    net = get_model("lenet5", in_channels=1, num_outputs=10).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(net(x), net(nn.functional.pad(x, (2, 2, 2, 2))))  # 28 is zero-padded to 32
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [6, 16]
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]


@pytest.mark.parametrize("size", [28, 64, 128])
@pytest.mark.parametrize("name", ["alexnet_small", "vgg_small", "inception_small"])
def test_classic_models_take_28_to_128(name: str, size: int) -> None:
    net = get_model(name, in_channels=3, num_outputs=5).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_inception_small_is_inception_v3_like_and_cheap() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    net = get_model("inception_small", in_channels=1, num_outputs=10, n=7).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert (1, 7) in {m.kernel_size for m in convs} and (7, 1) in {m.kernel_size for m in convs}
    assert all(isinstance(m, models.classic.BasicConv2d) for m in net.modules() if hasattr(m, "conv"))
    assert sum(p.numel() for p in net.parameters()) < 2_000_000
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 1, 28, 28))
    assert counter.get_total_flops() < 100e6


def test_vgg_cfg_builds_layers() -> None:
    net = get_model("vgg_small", in_channels=1, num_outputs=2, cfg=[8, "M", 16, "M"])
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [8, 16]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in get_model("vgg_small_bn").modules())


def test_unknown_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'nope'; known models: .*lenet5"):
        get_model("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(nn.Identity)


# --- torchvision weights ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a load that skips buffers would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_torchvision_weights_load(tmp_path, tv_resnet18: nn.Module, fmt: str) -> None:
    path = tmp_path / f"resnet18.{fmt}"
    state = {k: v.contiguous() for k, v in tv_resnet18.state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    x = torch.randn(2, 3, 32, 32)
    net = get_model("resnet18", weights=str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(net(x), tv_resnet18(x), atol=1e-5)
        # grey input: the summed RGB kernels see a grey image as the RGB model sees it
        grey = get_model("resnet18", in_channels=1, weights=str(path)).eval()
        assert torch.allclose(grey(x[:, :1]), tv_resnet18(x[:, :1].repeat(1, 3, 1, 1)), atol=1e-4)
        # another head size: features kept, head new
        ten = get_model("resnet18", num_outputs=10, weights=str(path)).eval()
        assert torch.allclose(ten.forward_features(x), net.forward_features(x), atol=1e-5)
        assert ten(x).shape == (2, 10)


def test_wrapper_state_dict_round_trip(tmp_path) -> None:
    src = get_model("mobilenet_v3_small", in_channels=1, num_outputs=4).eval()
    path = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = get_model("mobilenet_v3_small", in_channels=1, num_outputs=4, weights=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), src(x))
    with pytest.raises(WeightsError, match="ours.safetensors: weights do not fit"):
        get_model("mobilenet_v3_small", in_channels=1, num_outputs=5, weights=str(path))


def test_torchvision_weights_name_resolves_and_adapts(monkeypatch, tv_resnet18: nn.Module) -> None:
    urls = []

    def fake_download(url: str, **kwargs) -> dict:
        urls.append(url)
        assert kwargs.get("weights_only") is True
        return tv_resnet18.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    for name in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        net = get_model("resnet18", in_channels=1, num_outputs=10, weights=name)
        w = tv_resnet18.conv1.weight.sum(dim=1, keepdim=True)
        assert torch.equal(net.backbone.conv1.weight, w)
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url] * 3


def test_inception_v3_weights_drop_the_aux_branch(monkeypatch) -> None:
    src = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, **kw: src.state_dict())
    net = get_model("inception_v3", in_channels=3, num_outputs=1000, weights="DEFAULT").eval()
    assert net.backbone.AuxLogits is None and not net.backbone.transform_input
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        assert torch.allclose(net(x), src(x), atol=1e-5)
    net.train()
    assert net(torch.randn(2, 3, 75, 75)).shape == (2, 1000)  # a tensor, not InceptionOutputs


def test_offline_download_failure_is_one_clear_error(monkeypatch) -> None:
    def offline(url: str, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"ResNet18_Weights.IMAGENET1K_V1.*pass the local file"):
        get_model("resnet18", weights="DEFAULT")


def test_bad_weights_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Unknown weights 'NOPE_V9' for resnet18: .*ResNet18_Weights.IMAGENET1K_V1"):
        get_model("resnet18", weights="NOPE_V9")
    with pytest.raises(ValueError, match="Unknown weights 'ResNet50_Weights.IMAGENET1K_V1' for resnet18"):
        get_model("resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="does not exist"):
        get_model("resnet18", weights=str(tmp_path / "missing.pth"))

    pickled = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _NotATensor()}, pickled)
    with pytest.raises(WeightsError, match=r"evil.pth: refusing to unpickle"):
        get_model("resnet18", weights=str(pickled))

    truncated = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(100)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="cut.safetensors: cannot read weights"):
        get_model("resnet18", weights=str(truncated))

    other = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    with pytest.raises(WeightsError, match="other.pth: weights do not fit"):
        get_model("resnet18", weights=str(other))


class _NotATensor:
    """An arbitrary picklable object: ``torch.load(weights_only=True)`` must refuse it."""

    value = math.pi
