"""model.onnx in every bundle: ONNX Runtime gives what torch gives over the whole registry, the runtime
choice, and a tampered graph refused with one line.

    OMP_NUM_THREADS=2 .venv/bin/pytest tests/test_onnx.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.preprocess import PreprocessSpec
from models import get_model, get_model_builder, list_models
from models.bundle import META_FILE, BundleError, load_bundle, read_meta, read_onnx, save_bundle
from models.heads import predict
from models.onnx_graph import ONNX_FILE, OnnxMismatch, export_onnx, open_session
from serving.predictor import Predictor

CLASSES = ["a", "b", "c", "d", "e"]
BINS = [0.0, 20.0, 40.0, 60.0, 80.0]
# (task, outputs, tta): classifier and regressor heads (linear and distribution), with and without flip averaging
HEADS = {
    "cls": ("classification", 5, []),
    "cls-hflip": ("classification", 5, ["hflip"]),
    "linear": ("regression", 1, []),
    "bins-hflip": ("regression", 5, ["hflip"]),
}
TOLERANCE = {"classification": 1e-4, "regression": 1e-3}
HUGE = {"alexnet", "vgg11_bn", "vgg16"}  # 200-500 MB graphs, ~14 s an export: slow
CLASSIC = [n for n in list_models() if get_model_builder(n).__module__ == "models.classic"]


def _cases() -> list:
    cases = []
    for name in list_models():
        for head in HEADS:
            # every head on the classic line and resnet18; one per other backbone by default (cls-hflip: the
            # network itself, with the flip; the head and the augmentation are the same wrapper for every
            # network), all four with -m slow
            slow = name in HUGE or (name not in CLASSIC and name != "resnet18" and head != "cls-hflip")
            cases.append(pytest.param(name, head, marks=[pytest.mark.slow] if slow else []))
    return cases


def _net(name: str, outputs: int, channels: int = 1) -> tuple[nn.Module, dict, int]:
    """A network whose BatchNorm statistics moved off their defaults (as after training), and its input size."""
    builder_kwargs = {"in_channels": channels, "num_outputs": outputs}
    net = get_model(name, **builder_kwargs)
    size = max(28, net.min_input_size) if name in CLASSIC else net.min_input_size
    net.train()
    with torch.no_grad():
        net(torch.randn(2, channels, size, size) * 2 + 0.5)
    return net.eval(), builder_kwargs, size


def _bundle(out: Path, name: str, head: str, channels: int = 1) -> Path:
    task, outputs, tta = HEADS[head]
    net, kwargs, size = _net(name, outputs, channels)
    spec = PreprocessSpec(input_size=(size, size), channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    target = {"name": "age", "min": 0.0, "max": 116.0, **({"bins": BINS} if outputs > 1 else {})}
    return save_bundle(
        out, net, task=task, architecture=name, architecture_kwargs=kwargs, preprocess=spec,
        class_names=CLASSES if task == "classification" else None,
        target=target if task == "regression" else None, tta=tta,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "head"), _cases())
def test_onnx_runtime_matches_torch_over_the_registry(tmp_path: Path, name: str, head: str) -> None:
    bundle = _bundle(tmp_path / "b", name, head)
    net, meta = load_bundle(bundle)
    task = meta.task
    assert meta.onnx["opset"] >= 17 and (bundle / ONNX_FILE).is_file()
    session = open_session(read_onnx(bundle, meta))
    bins = torch.tensor(meta.bins) if meta.bins else None
    c, (h, w) = meta.preprocess.channels, meta.preprocess.input_size
    for n in (1, 5):
        x = torch.randn(n, c, h, w) * 1.5
        with torch.inference_mode():
            want = predict(net, x, task, bins, meta.tta).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == want.shape == ((n, 5) if task == "classification" else (n,))
        assert np.abs(got - want).max() <= TOLERANCE[task], (name, head, n, np.abs(got - want).max())
    if head == "cls-hflip":  # the flip averaging is in the graph: a mirrored input gives the same answer
        x = torch.randn(2, c, h, w)
        flipped = session.run(None, {"input": x.flip(-1).numpy()})[0]
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - flipped).max() < 1e-5


def test_export_refuses_a_graph_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that computes something else (here: the exporter sees another network) is refused, one line."""
    import models.onnx_graph as graph

    real = graph._to_bytes

    def other_network(module: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
        wrong = graph.Prediction(get_model("lenet5", in_channels=1, num_outputs=5).eval(), "classification")
        return real(wrong, example)

    monkeypatch.setattr(graph, "_to_bytes", other_network)
    with pytest.raises(BundleError, match=r"model.onnx: ONNX Runtime's output differs from torch's by .* bundle not"):
        _bundle(tmp_path / "b", "lenet5", "cls")
    assert not (tmp_path / "b").exists()
    with pytest.raises(OnnxMismatch) as e:
        export_onnx(get_model("simple_cnn").eval(), tmp_path / "x.onnx", task="classification", bins=None, tta=[],
                    input_shape=(1, 28, 28))  # fmt: skip
    assert "\n" not in str(e.value) and not (tmp_path / "x.onnx").exists()


def _tamper(bundle: Path) -> None:
    data = bytearray((bundle / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / ONNX_FILE).write_bytes(bytes(data))


def test_tampered_or_missing_onnx_is_a_one_line_bundle_error(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", "simple_cnn", "cls")
    _tamper(bundle)
    for load in (load_bundle, read_onnx, Predictor, lambda b: Predictor(b, runtime="torch")):
        with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match bundle.json") as e:
            load(bundle)
        assert "\n" not in str(e.value)
    (bundle / ONNX_FILE).unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        load_bundle(bundle)


def test_onnx_entry_names_no_file(tmp_path: Path) -> None:
    """bundle.json cannot point the loader elsewhere: the graph is always model.onnx in the folder."""
    bundle = _bundle(tmp_path / "b", "lenet5", "cls")
    raw = json.loads((bundle / META_FILE).read_text())
    raw["onnx"]["file"] = "/etc/passwd"
    (bundle / META_FILE).write_text(json.dumps(raw))
    assert read_onnx(bundle) == (bundle / ONNX_FILE).read_bytes()
    raw["onnx"] = {"sha256": "../../x"}
    (bundle / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="'onnx' must be an object with the sha256"):
        read_meta(bundle)


def test_add_onnx_to_an_older_bundle(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", "lenet5", "bins-hflip")
    raw = json.loads((bundle / META_FILE).read_text())
    del raw["onnx"]
    (bundle / META_FILE).write_text(json.dumps(raw))
    (bundle / ONNX_FILE).unlink()
    assert Predictor(bundle).runtime == "torch"  # auto: no graph, torch
    with pytest.raises(BundleError, match="no model.onnx to run"):
        Predictor(bundle, runtime="onnx")
    from training.export import main

    assert main(["--bundle", str(bundle), "--onnx"]) == 0
    assert read_meta(bundle).onnx and Predictor(bundle).runtime == "onnx"
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "model.onnx", "model.safetensors"]


@pytest.mark.parametrize("head", ["cls-hflip", "bins-hflip"])
def test_predictor_runtimes_agree(tmp_path: Path, head: str) -> None:
    bundle = _bundle(tmp_path / "b", "simple_cnn", head)
    fast, plain = Predictor(bundle, device="cpu"), Predictor(bundle, device="cpu", runtime="torch")
    assert (fast.runtime, plain.runtime) == ("onnx", "torch") and fast.model is None
    assert fast.info()["runtime"] == "onnx"
    x = torch.randn(7, 1, 28, 28)
    tol = TOLERANCE[fast.task]
    assert (fast.predict_tensors(x) - plain.predict_tensors(x)).abs().max() <= tol
    threads = torch.get_num_threads()
    try:  # ONNX Runtime follows torch's thread count: a session per count
        for n in (1, 2):
            torch.set_num_threads(n)
            assert (fast.predict_tensors(x) - plain.predict_tensors(x)).abs().max() <= tol
    finally:
        torch.set_num_threads(threads)
    assert {1, 2} <= set(fast.onnx.sessions)
    with pytest.raises(ValueError, match="runtime must be one of auto, onnx, torch"):
        Predictor(bundle, runtime="tensorrt")
