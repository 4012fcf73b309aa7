"""The built wheel works on its own: it holds every preset, and ``causeseg presets`` and the demo config load
from the unpacked wheel with the repository's ``src/`` out of reach (built offline, about 5 s)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "causeseg" / "configs"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy of the project files, so the build leaves nothing (build/, *.egg-info) in the repository
    proj = tmp / "project"
    proj.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp / "dist"), str(proj)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = (tmp / "dist").glob("causeseg-*.whl")
    return whl


def test_wheel_holds_every_preset_and_the_entry_point(wheel):
    presets = sorted(CONFIGS.glob("*.yaml"))
    assert len(presets) > 10 and (CONFIGS / "demo.yaml") in presets
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for p in presets:
            assert f"causeseg/configs/{p.name}" in names, p.name
            assert z.read(f"causeseg/configs/{p.name}") == p.read_bytes(), p.name
        assert "causeseg/py.typed" in names and "causeseg/cli.py" in names
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        eps = configparser.ConfigParser()
        eps.read_string(z.read(ep).decode())
    assert eps["console_scripts"]["causeseg"].strip() == "causeseg.cli:main"


def test_presets_and_demo_config_from_the_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # the environment's installed libraries, without running its .pth files (one of them is the editable
    # install that points at the repository's src/)
    libs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        sys.path[:] = [{str(site)!r}] + [p for p in sys.path if p] + {libs!r}
        import causeseg
        from causeseg.cli import main  # the console script's target (checked in the test above)
        from causeseg.config import CONFIG_DIR, load_config
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["presets"])
        cfg = load_config("demo")
        print(json.dumps({{"rc": rc, "presets": out.getvalue().split(), "file": causeseg.__file__,
                          "configs": str(CONFIG_DIR), "dataset": cfg.data.dataset, "path": sys.path,
                          "modules": sorted({{str(getattr(m, "__file__", "") or "") for m in list(sys.modules.values())
                                              if getattr(m, "__name__", "").startswith("causeseg")}})}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site-packages .pth processing
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    assert Path(res["file"]).resolve().is_relative_to(site.resolve())
    assert Path(res["configs"]).resolve() == (site / "causeseg" / "configs").resolve()
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in res["modules"] if f), res["modules"]
    assert str(REPO / "src") not in res["path"]
    expected = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("_"))
    assert res["presets"] == expected
    assert res["dataset"] == "images"  # demo.yaml trains on a folder of photos
