"""benchmarks/compare_architectures.py: counting, table and plot rendering; a --quick run when DATASETS_DIR is set.

pytest tests/test_compare.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from compare_architectures import count_params_macs, render_table  # noqa: E402


def _conv_macs(c_in: int, c_out: int, k: int, side: int) -> int:
    return c_in * c_out * k * k * side * side  # one MAC per weight per output pixel


def test_simple_cnn_params_and_macs_match_hand_count() -> None:
    params, macs = count_params_macs("simple_cnn")  # 1x28x28, 10 classes, the Keras original
    assert params == 60_874
    hand = (
        _conv_macs(1, 16, 3, 28)  # 'same' convs; each 2x2 pool halves the side: 28 -> 14 -> 7 -> 3
        + _conv_macs(16, 32, 3, 14)
        + _conv_macs(32, 64, 3, 7)
        + 64 * 3 * 3 * 64  # Dense 64
        + 64 * 10  # head
    )
    assert macs == hand == 1_956_736


def test_lenet5_macs_match_hand_count() -> None:
    params, macs = count_params_macs("lenet5")  # 28x28 is zero-padded to 32x32
    assert params == 61_706
    assert macs == _conv_macs(1, 6, 5, 28) + _conv_macs(6, 16, 5, 10) + 400 * 120 + 120 * 84 + 84 * 10


def test_batch_norm_adds_params_not_macs() -> None:
    plain = count_params_macs("simple_cnn")
    bn = count_params_macs("simple_cnn", {"batch_norm": True, "conv_activation": "relu"})
    assert bn == (plain[0] + 2 * (16 + 32 + 64), plain[1])


def test_unknown_model_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Unknown model"):
        count_params_macs("no_such_net")


def test_table_has_one_row_per_model() -> None:
    rows = [
        {"name": "a", "params": 1234, "macs": 2_500_000, "seconds_per_epoch": 3.25, "test_acc": 0.9123},
        {"name": "b", "params": 5, "macs": 10, "seconds_per_epoch": None, "test_acc": None},
    ]
    table = render_table({"models": rows}).splitlines()
    assert len(table) == 4
    assert table[2] == "| `a` | 1,234 | 2.50 M | 3.2 | 91.23 % |"
    assert table[3].endswith("| - | - |")


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_architectures.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_from_json_rerenders_table_and_plot(tmp_path: Path) -> None:
    """--from-json: the table and a PNG plot from a results file, without training; two close points both labelled."""
    rows = [
        {"name": "lenet5", "params": 61706, "macs": 416520, "seconds_per_epoch": 19.5, "test_acc": 0.8802},
        {"name": "alexnet_small", "params": 1689450, "macs": 50568960, "seconds_per_epoch": 235.2, "test_acc": 0.9144},
        {"name": "resnet18", "params": 11175370, "macs": 33010944, "seconds_per_epoch": 556.8, "test_acc": 0.9159},
    ]
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"settings": {"epochs": 5, "batch_size": 64}, "models": rows}))
    md, png = tmp_path / "t.md", tmp_path / "p.png"
    proc = _run("--from-json", str(results), "--out-md", str(md), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "| `resnet18` | 11,175,370 | 33.01 M | 556.8 | 91.59 % |" in md.read_text()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_from_json_bad_file_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        proc = _run("--from-json", str(path), "--plot", str(tmp_path / "p.png"))
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --from-json") and str(path) in lines[0], proc.stderr
    assert not (tmp_path / "p.png").exists()


@pytest.mark.skipif(not os.environ.get("DATASETS_DIR"), reason="needs DATASETS_DIR (the real Fashion-MNIST)")
def test_quick_run_on_real_data(tmp_path: Path) -> None:
    """--quick end to end on the real Fashion-MNIST: a real fit in a subprocess, JSON, table, plot (one model: a
    table of several is test_table_has_one_row_per_model's; each fit costs ~25 s on 2 cores)."""
    proc = _run("--quick", "--models", "lenet5", "--work-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "quick" / "arch_compare.json").read_text())
    assert [r["name"] for r in results["models"]] == ["lenet5"] and results["settings"]["quick"]
    for r in results["models"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds_per_epoch"] > 0 and r["macs"] > 0
    assert (tmp_path / "quick" / "arch_compare.png").stat().st_size > 1000
    assert "QUICK smoke run" in proc.stdout
