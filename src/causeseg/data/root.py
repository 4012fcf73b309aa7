"""Where the shared real data lives.

The shared evaluation sets (``camvid/train``, ``camvid/val``, ``cocostuff``, ``voc``, ``cityscapes``, ``ade20k``) sit
in one root folder. It is found, in this order, at:

1. ``$CAUSESEG_DATA_ROOT`` when that variable is set (and only there: a set variable that names a missing folder is an
   error, never silently replaced by a fallback);
2. ``<repo>/../shared/data``, the repository being located from this file's path;
3. ``./../shared/data`` relative to the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CAUSESEG_DATA_ROOT"

#: The shared sets and the label-map preset that reads their masks.
SHARED_SETS: dict[str, str] = {
    "camvid/train": "camvid11",
    "camvid/val": "camvid11",
    "cocostuff": "cocostuff27",
    "voc": "voc21",
    "cityscapes": "cityscapes27",
    "ade20k": "ade150",
}


def _candidates() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    repo = Path(__file__).resolve().parents[3]  # src/causeseg/data/root.py -> repo
    out = [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    seen: list[Path] = []
    for p in out:
        if p.resolve() not in [s.resolve() for s in seen]:
            seen.append(p)
    return seen


def data_root(required: bool = False) -> Path | None:
    """The shared data root, or ``None`` when absent (``required=True``: raise ``FileNotFoundError``).

    The error names every place that was looked at and how to point causeseg elsewhere.
    """
    cands = _candidates()
    for p in cands:
        if p.is_dir():
            return p.resolve()
    if required:
        where = ", ".join(str(p) for p in cands)
        how = (f"{ENV_VAR} is set but the folder does not exist" if os.environ.get(ENV_VAR)
               else f"set {ENV_VAR} to the folder that holds camvid/, cocostuff/, voc/, ...")
        raise FileNotFoundError(f"shared data not found (looked at: {where}); {how}")
    return None


def shared_set(name: str) -> Path:
    """Path of one shared set, e.g. ``shared_set('camvid/train')`` or ``shared_set('cocostuff')``.

    Raises ``KeyError`` for an unknown set name and ``FileNotFoundError`` when the set is not on disk.
    """
    key = name.strip("/")
    if key not in SHARED_SETS:
        raise KeyError(f"unknown shared set {name!r}; known: {sorted(SHARED_SETS)}")
    root = data_root(required=True)
    assert root is not None
    path = root / key
    if not path.is_dir():
        raise FileNotFoundError(f"shared set {key!r} not found at {path}")
    return path
