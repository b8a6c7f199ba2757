"""The batch script in ONNX Runtime reproduces the fit's own test metric on the real test sets (issue #22).

    DATASETS_DIR=/path/to/datasets pytest -m slow tests/test_batch_real_data.py

A short fit of each recipe (a few training batches: the metric only has to match, not be good)
scores its test set and records the metric in the bundle; the test set is then written out as
image files (Fashion-MNIST's test IDX as PNGs; UTKFace's test split as links, with
``python -m data.utkface``) and ``python -m serving.batch --runtime onnx --truth`` scores the
bundle's ``model.onnx`` on them. Accuracy must agree within 1e-4 (one image in 10,000), MAE
within 0.01 years.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.mnist import find_raw_file, read_idx
from models.bundle import read_meta
from training.cli import main as training_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.datasets]


def fit(config: str, name: str, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> Path:
    """A short fit of ``configs/<config>.yaml`` with test and export -> its bundle folder."""
    monkeypatch.setenv("SVERTKA_OUTPUT_DIR", str(out))
    args = ["fit", "-c", str(REPO / "configs" / f"{config}.yaml"), "--name", name,
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", *extra]  # fmt: skip
    assert training_main(args) == 0
    return out / "artifacts" / name


def batch(bundle: Path, images: Path, truth: Path, out: Path, *extra: str) -> dict:
    """``python -m serving.batch --runtime onnx --truth`` as a user runs it -> its metrics file."""
    cmd = [sys.executable, "-m", "serving.batch", "--model", str(bundle), "--input", str(images),
           "--output", str(out), "--truth", str(truth), "--runtime", "onnx", "--no-progress", *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runtime: onnx (ONNX Runtime)" in r.stderr, r.stderr[-2000:]
    print(r.stderr.strip().splitlines()[-2:])
    return json.loads(out.with_name(out.name + ".metrics.json").read_text())


def test_fashion_mnist_test_set_accuracy_as_the_fit_scored_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = fit("fashion_mnist_cnn", "fmnist_short", tmp_path, monkeypatch, "--trainer.limit_train_batches", "30")
    meta = read_meta(bundle)
    raw = Path(os.environ["DATASETS_DIR"]) / "FashionMNIST" / "raw"
    images = read_idx(find_raw_file(raw, "t10k-images-idx3-ubyte"))  # (10000, 28, 28) uint8
    labels = read_idx(find_raw_file(raw, "t10k-labels-idx1-ubyte"))
    folder = tmp_path / "fmnist_test"
    folder.mkdir()
    names = [f"{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image, mode="L").save(folder / name)  # lossless: the same pixels the fit read
    truth = tmp_path / "fmnist_labels.csv"
    pd.DataFrame({"name": names, "label": [meta.class_names[int(k)] for k in labels]}).to_csv(truth, index=False)

    got = batch(bundle, folder, truth, tmp_path / "fmnist.csv")
    fit_acc = meta.metrics["test/acc"]
    print(f"Fashion-MNIST: fit test/acc {fit_acc:.6f}, batch --runtime onnx {got['accuracy']:.6f} (n={got['n']})")
    assert got["n"] == len(images) == 10000
    assert abs(got["accuracy"] - fit_acc) <= 1e-4


def test_utkface_test_split_mae_as_the_fit_scored_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = fit("utkface_age", "utk_short", tmp_path, monkeypatch, "--trainer.limit_train_batches", "10")
    meta = read_meta(bundle)
    assert meta.faces and meta.tta  # aligned chips and flip averaging: both go through model.onnx / the batch script
    folder = tmp_path / "utk_test"
    cmd = [sys.executable, "-m", "data.utkface", "--root", os.environ["DATASETS_DIR"], "--split", "test",
           "--out", str(folder)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    # The files are UTKFace's aligned chips already, as the fit's test step read them: --no-detect.
    got = batch(bundle, folder, folder / "labels.csv", tmp_path / "ages.csv", "--no-detect")
    fit_mae = meta.metrics["test/mae"]
    print(f"UTKFace: fit test/mae {fit_mae:.6f}, batch --runtime onnx mae {got['mae']:.6f} (n={got['n']})")
    assert got["n"] == len(pd.read_csv(folder / "labels.csv"))
    assert abs(got["mae"] - fit_mae) <= 0.01
    assert np.isfinite(got["rmse"])
