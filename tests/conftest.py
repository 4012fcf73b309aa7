"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def camvid_tiny(tmp_path_factory):
    """8 train and 4 val CamVid pairs copied from the shared data (tests must not change them)."""
    from causeseg.data.root import data_root

    root = data_root()
    if root is None or not (root / "camvid" / "val" / "images").is_dir():
        pytest.skip("shared data not found (../shared/data or CAUSESEG_DATA_ROOT): camvid needed")
    out = tmp_path_factory.mktemp("camvid_tiny")
    for split, n in (("train", 8), ("val", 4)):
        src = root / "camvid" / split
        for sub in ("images", "masks"):
            (out / split / sub).mkdir(parents=True)
        for p in sorted((src / "images").glob("*.png"))[:n]:
            shutil.copy(p, out / split / "images" / p.name)
            shutil.copy(src / "masks" / p.name, out / split / "masks" / p.name)
    return out
