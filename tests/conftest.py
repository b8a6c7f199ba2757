"""Project-wide pytest set-up (kept small: package-specific helpers live in their test modules)."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``datasets`` when ``DATASETS_DIR`` (the real data sets) is unset."""
    if os.environ.get("DATASETS_DIR"):
        return
    skip = pytest.mark.skip(reason="needs the real data sets: set DATASETS_DIR")
    for item in items:
        if "datasets" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state, so random weights and inputs are repeatable."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded-image caches go to this session's temp folder, not the user's ``~/.cache/svertka``
    (unless ``SVERTKA_CACHE`` names one)."""
    os.environ.setdefault("SVERTKA_CACHE", str(tmp_path_factory.mktemp("svertka-cache")))
