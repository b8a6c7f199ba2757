"""The house's layers hold: ``lint-imports`` checks the contracts in pyproject.toml (data at the bottom,
then models, then training and serving, independent of each other; serving and models without Lightning).

    pytest tests/test_layers.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]'")
    return exe


def test_layer_contracts_hold() -> None:
    run = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_a_reverse_import_breaks_them(tmp_path: Path) -> None:
    """The check can fail: a copy of the tree where data imports serving breaks the layer contract."""
    for package in ("data", "models", "training", "serving"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "data" / "imagefile.py", "a") as f:
        f.write("\nfrom serving import batch_output  # noqa: E402,F401\n")
    run = subprocess.run([lint_imports(), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "data.imagefile -> serving.batch_output" in run.stdout, run.stdout
