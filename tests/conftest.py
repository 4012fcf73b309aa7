"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _find_data_root() -> tuple[Path | None, str]:
    try:
        from causeseg.data.root import _candidates, data_root

        return data_root(), ", ".join(str(p) for p in _candidates())
    except ImportError:  # pragma: no cover - the data package is part of the repo
        env = os.environ.get("CAUSESEG_DATA_ROOT")
        cand = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
        return (cand if cand.is_dir() else None), str(cand)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real data root (``CAUSESEG_DATA_ROOT`` or ``../shared/data``); skips when absent."""
    root, where = _find_data_root()
    if root is None:
        pytest.skip(f"shared data not found at {where}; set CAUSESEG_DATA_ROOT")
    return root
