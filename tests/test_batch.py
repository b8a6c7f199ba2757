"""The batch script: folder / CSV / glob in, CSV / Parquet out, bad files as error rows, fatal errors.

pytest tests/test_batch.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data.preprocess import PreprocessSpec, load_image, preprocess
from models import get_model
from models.bundle import load_bundle, save_bundle
from serving import batch
from serving import predictor as predictor_module
from serving.predictor import Predictor, Prepared

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class_{i}" for i in range(10)]


def make_bundles(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    clf = get_model("lenet5", in_channels=1, num_outputs=10)
    with torch.no_grad():
        clf.head.weight.mul_(20)
    save_bundle(
        root / "clf",
        clf,
        task="classification",
        architecture="lenet5",
        architecture_kwargs={"in_channels": 1, "num_outputs": 10},
        preprocess=PreprocessSpec(input_size=(28, 28), channels=1, mean=(0.5,), std=(0.5,)),
        class_names=CLASSES,
    )
    reg = get_model("lenet5", in_channels=3, num_outputs=1)
    with torch.no_grad():
        reg.head.bias.fill_(40.0)
        reg.head.weight.mul_(50)
    save_bundle(
        root / "age",
        reg,
        task="regression",
        architecture="lenet5",
        architecture_kwargs={"in_channels": 3, "num_outputs": 1},
        preprocess=PreprocessSpec(input_size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
        target={"name": "age", "min": 0, "max": 116},
    )
    return {"clf": root / "clf", "age": root / "age"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("batch")
    bundles = make_bundles(root / "bundles")
    images = root / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(13):
        arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(["RGB", "L", "RGBA", "P"][i % 4])
        sub = ["", "sub", "sub/deeper"][i % 3]
        path = images / sub / f"img{i:02d}.{'jpg' if img.mode in ('RGB', 'L') and i % 2 else 'png'}"
        img.save(path)
        good.append(path)
    (images / "corrupt.png").write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (images / "sub" / "truncated.png").write_bytes(buf.getvalue()[:300])
    (images / "notes.txt").write_text("not an image, and not listed: wrong extension")
    return {"root": root, "bundles": bundles, "images": images, "good": good}


def reference(bundle: Path, path: Path) -> np.ndarray:
    net, meta = load_bundle(bundle)
    x = preprocess(load_image(path, meta.preprocess.channels), meta.preprocess)[None]
    with torch.no_grad():
        out = net(x)
    if meta.task == "classification":
        return out.softmax(1)[0].numpy()
    return out[:, 0].clamp(0, 116).numpy()


def run(*args: str | Path) -> int:
    return batch.main([str(a) for a in args] + ["--no-progress"])


def test_folder_to_csv(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    assert run("--model", setup["bundles"]["clf"], "--input", setup["images"], "--output", out, "--top-k", "3",
               "--workers", "0", "--batch-size", "4") == 0  # fmt: skip
    table = pd.read_csv(out)
    expected = sorted([*setup["good"], setup["images"] / "corrupt.png", setup["images"] / "sub" / "truncated.png"])
    assert table["path"].tolist() == [str(p) for p in expected]  # recursive, sorted, .txt skipped
    assert list(table.columns) == ["path", "label", "score", "top1_label", "top1_score", "top2_label",
                                   "top2_score", "top3_label", "top3_score", "error"]  # fmt: skip
    bad = table[table["error"].notna()]
    assert sorted(Path(p).name for p in bad["path"]) == ["corrupt.png", "truncated.png"]
    errors = dict(zip(bad["path"].map(lambda p: Path(p).name), bad["error"], strict=True))
    assert "not a recognized image" in errors["corrupt.png"] and "truncated" in errors["truncated.png"].lower()
    assert bad["label"].isna().all()
    ok = table[table["error"].isna()]
    for row in ok.itertuples(index=False):
        ref = reference(setup["bundles"]["clf"], Path(row.path))
        assert row.label == CLASSES[int(ref.argmax())] == row.top1_label
        assert row.score == pytest.approx(float(ref.max()), abs=1e-5)
        assert row.top2_score == pytest.approx(float(np.sort(ref)[-2]), abs=1e-5)


def test_csv_input_keeps_order_and_writes_parquet(setup: dict, tmp_path: Path) -> None:
    images = setup["images"]
    listed = [str(p.relative_to(images)) for p in reversed(setup["good"][:5])] + ["missing.png", "corrupt.png"]
    csv = images / "list.csv"
    pd.DataFrame({"path": listed, "other": range(len(listed))}).to_csv(csv, index=False)
    try:
        out = tmp_path / "labels.parquet"
        assert run("--model", setup["bundles"]["clf"], "--input", csv, "--output", out, "--workers", "2") == 0
    finally:
        csv.unlink()
    table = pd.read_parquet(out)
    assert table["path"].tolist() == listed  # as listed, relative to the CSV's folder
    assert table["error"].isna().tolist() == [True] * 5 + [False, False]
    assert "no such file" in table["error"].iloc[5]
    assert [c for c in table.columns if c.endswith("_label")] == [f"top{j}_label" for j in range(1, 6)]
    for row in table.iloc[:5].itertuples(index=False):
        ref = reference(setup["bundles"]["clf"], images / row.path)
        assert row.score == pytest.approx(float(ref.max()), abs=1e-5)


def test_glob_input_regressor(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "ages.csv"
    pattern = str(setup["images"] / "**" / "*.png")
    assert run("--model", setup["bundles"]["age"], "--input", pattern, "--output", out, "--workers", "2",
               "--batch-size", "3") == 0  # fmt: skip
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "age", "error"]
    pngs = sorted(p for p in setup["images"].rglob("*.png"))
    assert table["path"].tolist() == [str(p) for p in pngs]
    ok = table[table["error"].isna()]
    assert len(ok) == len(pngs) - 2 and ok["age"].between(0, 116).all()
    for row in ok.itertuples(index=False):
        assert row.age == pytest.approx(float(reference(setup["bundles"]["age"], Path(row.path))[0]), abs=1e-5)


def test_collate_sends_each_input_once_in_the_batch() -> None:
    # A decoding worker pickles what collate returns: a tensor left in the items would travel a
    # second time, through a shared-memory segment of its own (a quarter of simple_cnn's files/s).
    face = {"box": [0, 0, 4, 4], "score": 0.9}
    items = [
        (0, Prepared([face], torch.ones(1, 3, 8, 8), (8, 8)), None),
        (1, None, "truncated"),
        (2, Prepared([], torch.zeros(0, 3, 8, 8), (8, 8)), None),  # no face found
        (3, Prepared([face, face], torch.full((2, 3, 8, 8), 2.0), (9, 9)), None),
    ]
    files, inputs = batch.collate(items)
    assert files == [(0, [face], 1, None), (1, [], 0, "truncated"), (2, [], 0, None), (3, [face, face], 2, None)]
    assert inputs.shape == (3, 3, 8, 8) and inputs[1:].eq(2).all()
    assert batch.collate([(0, None, "bad")]) == ([(0, [], 0, "bad")], None)


def test_optimize_runs_torchscript_by_default_same_rows(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    made: list[Predictor] = []
    monkeypatch.setattr(batch, "Predictor", lambda *a, **k: made.append(Predictor(*a, **k)) or made[-1])
    tables = []
    for flags in (["--runtime", "torch"], ["--runtime", "torch", "--no-optimize"]):
        out = tmp_path / f"ages{len(tables)}.csv"
        assert run("--model", setup["bundles"]["age"], "--input", setup["images"], "--output", out,
                   "--workers", "0", "--batch-size", "5", *flags) == 0  # fmt: skip
        tables.append(pd.read_csv(out))
    assert [p.forward_mode for p in made] == ["torchscript", "eager"]
    assert tables[0]["age"].notna().sum() == len(setup["good"])
    pd.testing.assert_frame_equal(tables[0], tables[1], rtol=0, atol=1e-4)  # batch sizes the trace never saw
    assert "note:" not in capsys.readouterr().err

    # A model the traced forward does not match runs as it is, with one line saying why.
    monkeypatch.setattr(predictor_module, "trace_for_cpu", lambda model, shape: (None, "RuntimeError: untraceable"))
    out = tmp_path / "ages_eager.csv"
    args = ("--model", setup["bundles"]["age"], "--input", setup["images"], "--output", out, "--workers", "0")
    assert run(*args, "--runtime", "torch") == 0
    assert made[-1].forward_mode == "eager (RuntimeError: untraceable)"
    assert "note: --optimize: the model runs as it is (RuntimeError: untraceable)" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(out), tables[1], rtol=0, atol=1e-4)  # eager, another batch size


def test_truth_scores_regressor_by_name_and_classifier_by_path(setup: dict, tmp_path: Path) -> None:
    good = setup["good"]
    ages = {p.name: 10.0 + 3 * i for i, p in enumerate(good)}
    truth = tmp_path / "labels.csv"
    pd.DataFrame({"name": list(ages), "age": list(ages.values())}).to_csv(truth, index=False)
    out = tmp_path / "ages.csv"
    assert run("--model", setup["bundles"]["age"], "--input", setup["images"], "--output", out, "--workers", "0",
               "--truth", truth) == 0  # fmt: skip
    table = pd.read_csv(out).dropna(subset=["age"])
    err = table["age"] - [ages[Path(p).name] for p in table["path"]]
    metrics = json.loads((tmp_path / "ages.csv.metrics.json").read_text())
    assert metrics["n"] == len(good) == len(table)
    assert metrics["mae"] == pytest.approx(float(err.abs().mean()), abs=1e-9)
    assert metrics["rmse"] == pytest.approx(float((err**2).mean() ** 0.5), abs=1e-9)
    assert metrics["cs5"] == pytest.approx(float((err.abs() <= 5).mean()), abs=1e-9)

    labels = tmp_path / "classes.csv"  # classifier, keys are the paths as the output shows them
    half = good[: len(good) // 2]
    pd.DataFrame({"path": [str(p) for p in half], "label": ["class_3"] * len(half)}).to_csv(labels, index=False)
    out = tmp_path / "labels.csv"
    assert run("--model", setup["bundles"]["clf"], "--input", setup["images"], "--output", out, "--workers", "0",
               "--truth", labels) == 0  # fmt: skip
    table = pd.read_csv(out).set_index("path")
    expected = float((table.loc[[str(p) for p in half], "label"] == "class_3").mean())
    metrics = json.loads((tmp_path / "labels.csv.metrics.json").read_text())
    assert metrics == {"truth": str(labels), "n": len(half), "accuracy": pytest.approx(expected)}


@pytest.mark.parametrize(
    "content, message",
    [("name,years\na.png,3\n", "needs a 'path' or 'name' column and a 'age' column"),
     ("name,age\nimg00.jpg,old\n", "line 2: 'age' is not a number"),
     ("name,age\nnot_there.png,3\n", "none of its rows matches")],
)  # fmt: skip
def test_bad_truth_file_one_line_no_output(
    setup: dict, tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    truth = tmp_path / "truth.csv"
    truth.write_text(content)
    out = tmp_path / "out.csv"
    assert run("--model", setup["bundles"]["age"], "--input", setup["images"], "--output", out, "--workers", "0",
               "--truth", truth) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --truth {truth}") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("bundle", ["clf", "age"])
def test_onnx_runtime_by_default_same_rows_as_torch(
    setup: dict, tmp_path: Path, bundle: str, capsys: pytest.CaptureFixture
) -> None:
    tables = {}
    for runtime in ("auto", "onnx", "torch"):
        out = tmp_path / f"{runtime}.csv"
        assert run("--model", setup["bundles"][bundle], "--input", setup["images"], "--output", out,
                   "--workers", "0", "--batch-size", "4", "--runtime", runtime) == 0  # fmt: skip
        tables[runtime] = pd.read_csv(out)
        summary = capsys.readouterr().err.strip().splitlines()[-1]
        want = "runtime: onnx (ONNX Runtime)" if runtime != "torch" else "runtime: torch (torchscript)"
        assert summary.endswith(want), summary
    assert tables["auto"].notna().sum().sum() > len(setup["good"])
    pd.testing.assert_frame_equal(tables["auto"], tables["onnx"])
    # label columns identical, scores / ages within the runtimes' tolerance
    pd.testing.assert_frame_equal(tables["onnx"], tables["torch"], rtol=0, atol=1e-4 if bundle == "clf" else 1e-3)


def _fatal(setup: dict, tmp_path: Path, case: str) -> tuple[list[str], Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("file\na.png\n")
    model, inputs, out = str(setup["bundles"]["clf"]), str(setup["images"]), tmp_path / "out.csv"
    if case == "no such model":
        model = str(tmp_path / "no_bundle_here")
    elif case == "unknown tag":
        model = "no_such_model_tag:v1"
    elif case == "not a bundle":
        model = str(empty)
    elif case == "no inputs":
        inputs = str(empty)
    elif case == "glob matches nothing":
        inputs = str(tmp_path / "*.png")
    elif case == "csv without path column":
        inputs = str(nocol)
    elif case == "bad output extension":
        out = tmp_path / "out.xlsx"
    elif case == "output folder missing":
        out = tmp_path / "no" / "such" / "out.csv"
    elif case.startswith("tampered model.onnx"):
        model = str(tmp_path / "tampered")
        shutil.copytree(setup["bundles"]["clf"], model)
        data = bytearray((tmp_path / "tampered" / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "tampered" / "model.onnx").write_bytes(bytes(data))
        extra = case.removeprefix("tampered model.onnx").split()
        return ["--model", model, "--input", inputs, "--output", str(out), "--workers", "0", *extra], out
    return ["--model", model, "--input", inputs, "--output", str(out), "--workers", "0"], out


FATAL = [
    "no such model",
    "unknown tag",
    "not a bundle",
    "no inputs",
    "glob matches nothing",
    "csv without path column",
    "bad output extension",
    "output folder missing",
    "tampered model.onnx",
    "tampered model.onnx --runtime torch",
]


@pytest.mark.parametrize("case", FATAL)
def test_fatal_errors_one_line_no_output(
    setup: dict, tmp_path: Path, case: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # an empty store for tags
    args, out = _fatal(setup, tmp_path, case)
    assert run(*args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    """``python -m serving.batch ARGS`` in a child process (one torch thread), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "serving.batch", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_fatal_error_from_the_command_line(setup: dict, tmp_path: Path) -> None:
    r = run_cli("--model", tmp_path / "nope", "--input", setup["images"], "--output", tmp_path / "out.csv")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --model {tmp_path / 'nope'}: not a bundle folder"]
    assert not (tmp_path / "out.csv").exists()


def test_failures_leave_no_partial_output(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "labels.csv"
    out.write_text("previous results\n")
    args = ["--model", setup["bundles"]["clf"], "--input", setup["images"], "--output", out, "--workers", "0"]

    def write_half_then_fail(self: pd.DataFrame, path: Path, **kw: object) -> None:
        Path(path).write_text("path,label\nhalf")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", write_half_then_fail)
    assert run(*args) == 1
    monkeypatch.undo()

    def interrupt(self: object, batch_: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.Predictor, "predict_tensors", interrupt)
    assert run(*args) == 130
    assert out.read_text() == "previous results\n"  # untouched: whole or not at all
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]


@pytest.mark.parametrize("weights", ["/etc/passwd", "http://example.com/w.pth"])
def test_bundle_naming_outside_weights_is_refused(setup: dict, tmp_path: Path, weights: str) -> None:
    """``"weights"`` in bundle.json: one ``error:`` line naming the key, exit 1, no output file."""
    import shutil

    bad = tmp_path / "bad_bundle"
    shutil.copytree(setup["bundles"]["clf"], bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["architecture"]["kwargs"]["weights"] = weights
    (bad / "bundle.json").write_text(json.dumps(meta))
    out = tmp_path / "out.csv"
    args = ["--model", str(bad), "--input", str(setup["images"]), "--output", str(out), "--workers", "0"]
    r = run_cli(*args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model {bad}: "), r.stderr[-2000:]
    assert "architecture argument 'weights' is refused" in lines[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad_bundle"]
