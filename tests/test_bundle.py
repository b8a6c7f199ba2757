"""Bundles: round trips for every classic model (in process and in a fresh, Lightning-free process),
and a clear ``BundleError`` naming the file for every way a bundle can be broken.

    OMP_NUM_THREADS=2 .venv/bin/pytest tests/test_bundle.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from data.imagefile import sha256_file
from data.preprocess import PreprocessSpec
from models import get_model, get_model_builder, list_models
from models.bundle import META_FILE, WEIGHTS_FILE, BundleError, load_bundle, read_meta, save_bundle

REPO = Path(__file__).resolve().parents[1]
CLASSIC = [n for n in list_models() if get_model_builder(n).__module__ == "models.classic"]
KWARGS = {  # non-default architecture arguments, so their round trip is checked too
    "simple_cnn": {"conv_activation": "relu", "batch_norm": True},
    "vgg_small": {"cfg": [16, "M", 32, "M"]},
    "inception_small": {"n": 7},
}
SPEC = PreprocessSpec(input_size=(28, 28), channels=1, mean=(0.5,), std=(0.5,))
CLASSES = ["cat", "dog", "owl"]


def _trained_like(name: str, **extra) -> tuple[nn.Module, dict]:
    """A model whose BatchNorm statistics moved away from their defaults (as after training)."""
    kwargs = {"in_channels": 1, "num_outputs": len(CLASSES), **KWARGS.get(name, {}), **extra}
    net = get_model(name, **kwargs).train()
    with torch.no_grad():
        net(torch.randn(4, 1, 28, 28) * 3 + 1)
    return net.eval(), kwargs


def _save(out: Path, name: str, net: nn.Module, kwargs: dict) -> Path:
    return save_bundle(
        out, net, task="classification", architecture=name, architecture_kwargs=kwargs,
        preprocess=SPEC, class_names=CLASSES, metrics={"val_acc": 0.5}, training_config={"seed": 0},
    )  # fmt: skip


@pytest.mark.parametrize("name", CLASSIC + ["resnet18"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    net, kwargs = _trained_like(name)
    if name == "resnet18":
        kwargs["weights"] = "DEFAULT"  # dropped by save_bundle (weights come from the file): never downloaded
    out = _save(tmp_path / "bundle", name, net, kwargs)
    loaded, meta = load_bundle(out)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert not loaded.training
    assert meta.architecture == {"name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "weights"}}
    assert meta.class_names == CLASSES and meta.num_outputs == 3 and meta.preprocess == SPEC
    assert meta.metrics == {"val_acc": 0.5} and meta.weights_sha256 == sha256_file(out / WEIGHTS_FILE)


@pytest.mark.slow  # ~12 s; by default test_round_trip (every architecture) and, in a fresh process without
# Lightning, test_training's test_bundle_matches_lightning_module_without_lightning check the same
def test_round_trip_in_a_fresh_process_without_lightning(tmp_path: Path) -> None:
    expected = {}
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    for name in CLASSIC:
        net, kwargs = _trained_like(name)
        _save(tmp_path / name, name, net, kwargs)
        with torch.no_grad():
            expected[name] = net(x).tolist()
    code = f"""
import json, sys, torch
from models.bundle import load_bundle
x, out = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True), {{}}
for name in {CLASSIC!r}:
    net, meta = load_bundle({str(tmp_path)!r} + "/" + name)
    assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules, "load_bundle imported lightning"
    with torch.no_grad():
        out[name] = net(x).tolist()
    assert "lightning" not in sys.modules, "running the model imported lightning"
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in CLASSIC:
        assert torch.allclose(torch.tensor(got[name]), torch.tensor(expected[name]), atol=1e-6), name


@pytest.fixture(scope="module")
def saved_lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lenet5 bundle written once (its ONNX export and check are the cost); tests get a copy."""
    torch.manual_seed(0)
    net, kwargs = _trained_like("lenet5")
    return _save(tmp_path_factory.mktemp("saved") / "lenet", "lenet5", net, kwargs)


@pytest.fixture()
def bundle(tmp_path: Path, saved_lenet: Path) -> Path:
    """A fresh copy of ``saved_lenet`` that the test may break."""
    return Path(shutil.copytree(saved_lenet, tmp_path / "lenet"))


def _set_meta(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / META_FILE).read_text())
    meta.update(changes)
    (bundle / META_FILE).write_text(json.dumps(meta))


def test_corrupt_bundle_json(bundle: Path) -> None:
    (bundle / META_FILE).write_text('{"task": "classification", ')
    with pytest.raises(BundleError, match=r"bundle\.json: corrupt JSON"):
        load_bundle(bundle)


def test_bundle_json_missing_a_field(bundle: Path) -> None:
    meta = json.loads((bundle / META_FILE).read_text())
    del meta["preprocess"]
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"bundle\.json: missing field 'preprocess'"):
        read_meta(bundle)


def test_truncated_weights_fail_the_sha_check(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 does not match"):
        load_bundle(bundle)


def test_truncated_weights_with_a_matching_sha(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    _set_meta(bundle, weights_sha256=sha256_file(weights))
    with pytest.raises(BundleError, match=r"model\.safetensors: weights do not match architecture 'lenet5'"):
        load_bundle(bundle)


def test_sha_mismatch(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same length, one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 does not match"):
        load_bundle(bundle)


def test_weights_of_another_architecture(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    save_model(get_model("simple_cnn", in_channels=1, num_outputs=3), str(weights))
    _set_meta(bundle, weights_sha256=sha256_file(weights))  # bundle.json still says lenet5
    with pytest.raises(BundleError, match=r"model\.safetensors: weights do not match architecture 'lenet5'"):
        load_bundle(bundle)


def test_unknown_architecture(bundle: Path) -> None:
    _set_meta(bundle, architecture={"name": "lenet6", "kwargs": {}})
    with pytest.raises(BundleError, match=r"cannot build architecture 'lenet6'.*known models"):
        load_bundle(bundle)


def test_missing_folder_and_files(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"nowhere: not a bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (bundle / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors is missing"):
        load_bundle(bundle)
    (bundle / META_FILE).unlink()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        load_bundle(bundle)


def test_save_over_an_existing_bundle_replaces_it_whole(bundle: Path) -> None:
    (bundle / "stale.txt").write_text("from an older export")
    net, kwargs = _trained_like("simple_cnn")
    _save(bundle, "simple_cnn", net, kwargs)
    assert sorted(p.name for p in bundle.iterdir()) == [META_FILE, "model.onnx", WEIGHTS_FILE]
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]  # no temp or old folders left
    loaded, meta = load_bundle(bundle)
    assert meta.architecture["name"] == "simple_cnn"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A bundle loads nothing from outside its folder
# ---------------------------------------------------------------------------------------------

OUTSIDE = {  # architecture kwargs that would reach outside the bundle -> words the BundleError must hold
    "weights /etc/passwd": ({"weights": "/etc/passwd"}, "'weights' is refused"),
    "weights URL": ({"weights": "https://example.com/resnet18.pth"}, "'weights' is refused"),
    "weights null": ({"weights": None}, "'weights' is refused"),
    "unknown key": ({"checkpoint": "x"}, "'checkpoint' is not one 'lenet5' accepts"),
    "path value": ({"input_size": "/etc/passwd"}, "'input_size' looks like a path or URL"),
    "file URL value": ({"input_size": "file:///etc/passwd"}, "'input_size' looks like a path or URL"),
    "http URL value": ({"input_size": "http://example.com/x"}, "'input_size' looks like a path or URL"),
    "home path": ({"input_size": "~/weights"}, "'input_size' looks like a path or URL"),
    "relative path": ({"input_size": "../../x"}, "'input_size' looks like a path or URL"),
    "weights file name": ({"input_size": "model.pth"}, "'input_size' looks like a path or URL"),
    "nested": ({"input_size": [32, {"a": "s3://bucket/w"}]}, "'input_size' looks like a path or URL"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_architecture_arguments_from_outside_are_refused(bundle: Path, case: str) -> None:
    extra, words = OUTSIDE[case]
    _set_meta(bundle, architecture={"name": "lenet5", "kwargs": {"in_channels": 1, "num_outputs": 3, **extra}})
    for load in (read_meta, load_bundle):
        with pytest.raises(BundleError) as e:
            load(bundle)
        message = str(e.value)
        assert "\n" not in message and message.startswith(str(bundle / META_FILE)) and words in message, message


def test_weights_file_is_never_read(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``weights`` entry naming a real weights file: refused before the builder could read it."""
    from models import torchvision_models

    outside = bundle.parent / "outside.safetensors"
    save_model(get_model("resnet18", in_channels=1, num_outputs=3), str(outside))
    read: list[str] = []
    real = torchvision_models._read_weights
    monkeypatch.setattr(torchvision_models, "_read_weights", lambda arch, w: read.append(w) or real(arch, w))
    get_model("resnet18", in_channels=1, num_outputs=3, weights=str(outside))
    assert read == [str(outside)]  # the builder alone would load it
    _set_meta(bundle, architecture={"name": "resnet18", "kwargs": {"num_outputs": 3, "weights": str(outside)}})
    with pytest.raises(BundleError, match="'weights' is refused"):
        load_bundle(bundle)
    assert read == [str(outside)]  # not read again


def test_legitimate_architecture_arguments_still_load(tmp_path: Path) -> None:
    for name, kwargs in (("simple_cnn", {"conv_activation": "relu", "batch_norm": True, "input_size": 28}),
                         ("vgg_small", {"cfg": [16, "M", 32, "M"], "dropout": 0.1}),
                         ("resnet18", {"weights": None})):  # fmt: skip
        net, kwargs = _trained_like(name, **kwargs)
        out = _save(tmp_path / name, name, net, kwargs)
        loaded, meta = load_bundle(out)
        assert "weights" not in meta.architecture["kwargs"] and meta.architecture["kwargs"]["in_channels"] == 1


def test_save_refuses_a_bundle_that_would_not_load(tmp_path: Path) -> None:
    net, kwargs = _trained_like("lenet5")
    with pytest.raises(BundleError, match="'input_size' looks like a path or URL"):
        _save(tmp_path / "bad", "lenet5", net, {**kwargs, "input_size": "/tmp/x"})
    assert not list(tmp_path.iterdir())  # nothing written
