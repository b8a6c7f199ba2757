"""benchmarks/compare_architectures.py: parameter and multiply-add counting, table rendering (no training).

pytest tests/test_compare.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
