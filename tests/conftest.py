"""Shared fixtures: the repo root on sys.path and small generated datasets in the real formats."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from synthetic import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six training samples and three test images, RGBA LZW + float64 labels."""
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_test=3, size=(96, 112), cells=(5, 10), seed=0)


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path
