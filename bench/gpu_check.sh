#!/usr/bin/env bash
# Training-step speed of iresnet50 on one NVIDIA GPU, fp32 and mixed float16, XLA on, batch 128,
# next to insightface's reported ~690 images/s per V100 for r50 in fp16.
#
#   bash bench/gpu_check.sh                      # from the repository root
#   WHEEL_DIR=/path/to/wheels bash bench/gpu_check.sh   # install offline from a wheel folder
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh    # tiny CPU run of the same steps (32x32, 2 steps)
#
# Installs tensorflow[and-cuda]>=2.16 and this package with pip when TensorFlow does not import
# or sees no GPU (from WHEEL_DIR with --no-index when given). Logs and JSON results go to
# ${OUT:-./gpu_check_out}. Exits non-zero when a step fails or no GPU is visible (outside smoke).
set -euo pipefail

OUT_DIR="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
REFERENCE_IMAGES_PER_S=690
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }
fail() { say "gpu_check: FAILED: $*"; exit 1; }

[ -f setup.cfg ] && [ -d faceid_keras ] || fail "run from the repository root (bash bench/gpu_check.sh)"

gpu_count() {
  "$PYTHON" - <<'EOF' 2>>"$LOG" || echo -1
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
print(len(tf.config.list_physical_devices("GPU")))
EOF
}

say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE python=$($PYTHON --version 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG" || true

GPUS="$(gpu_count | tail -n 1)"
if [ "$SMOKE" != "1" ] && [ "$GPUS" -lt 1 ]; then
  say "TensorFlow with GPU support not found (GPUs seen: $GPUS); installing"
  PIP_ARGS=()
  if [ -n "${WHEEL_DIR:-}" ]; then PIP_ARGS=(--no-index --find-links "$WHEEL_DIR"); fi
  "$PYTHON" -m pip install "${PIP_ARGS[@]}" "tensorflow[and-cuda]>=2.16" >>"$LOG" 2>&1 || fail "pip install tensorflow[and-cuda] (see $LOG)"
  GPUS="$(gpu_count | tail -n 1)"
fi
if ! "$PYTHON" -c "import faceid_keras" >>"$LOG" 2>&1; then
  PIP_ARGS=()
  if [ -n "${WHEEL_DIR:-}" ]; then PIP_ARGS=(--no-index --find-links "$WHEEL_DIR"); fi
  "$PYTHON" -m pip install "${PIP_ARGS[@]}" -e . >>"$LOG" 2>&1 || fail "pip install -e . (see $LOG)"
fi
if [ "$SMOKE" != "1" ] && [ "$GPUS" -lt 1 ]; then
  fail "no GPU visible to TensorFlow after installing (see $LOG)"
fi
say "GPUs visible to TensorFlow: $GPUS"

if [ "$SMOKE" = "1" ]; then
  COMMON=(--backbone iresnet50 --image_size 32 --batch_size 4 --steps 2 --rounds 1 --num_classes 100
          --matmul_size 256 --jit_compile false --onednn 1)
else
  COMMON=(--backbone iresnet50 --image_size 112 --batch_size 128 --steps "${GPU_CHECK_STEPS:-20}" --rounds 3
          --num_classes "${GPU_CHECK_CLASSES:-85742}" --matmul_size 8192 --jit_compile true
          --prefetch_to_device true)
fi

for PRECISION in float32 mixed_float16; do
  say "== train_step: $PRECISION"
  if ! "$PYTHON" bench/train_step.py "${COMMON[@]}" --precision "$PRECISION" --json \
      > "$OUT_DIR/train_step_$PRECISION.txt" 2> "$OUT_DIR/train_step_$PRECISION.err"; then
    tail -n 30 "$OUT_DIR/train_step_$PRECISION.err" | tee -a "$LOG"
    fail "bench/train_step.py --precision $PRECISION"
  fi
  sed '$d' "$OUT_DIR/train_step_$PRECISION.txt" | tee -a "$LOG"
  tail -n 1 "$OUT_DIR/train_step_$PRECISION.txt" > "$OUT_DIR/train_step_$PRECISION.json"
done

"$PYTHON" - "$OUT_DIR" "$REFERENCE_IMAGES_PER_S" <<'EOF' | tee -a "$LOG"
import json, sys
out, reference = sys.argv[1], float(sys.argv[2])
print(f"{'precision':<15}{'model':<10}{'img/s':>10}{'x 690':>8}{'GFLOP/s':>10}{'%matmul':>9}{'1st call s':>12}")
for precision in ("float32", "mixed_float16"):
    with open(f"{out}/train_step_{precision}.json") as f:
        result = json.load(f)
    for name, r in result["models"].items():
        print(f"{precision:<15}{name:<10}{r['images_per_s']:>10.1f}{r['images_per_s'] / reference:>8.2f}"
              f"{r['gflops_per_s']:>10.0f}{100 * r['gflops_per_s'] / result['matmul_gflops_per_s']:>8.1f}%"
              f"{r['first_call_s']:>12.1f}")
    print(f"{precision:<15}arcface overhead over softmax: {100 * result['arcface_overhead']:+.1f}%; "
          f"matmul {result['matmul_gflops_per_s']:.0f} GFLOP/s; peak host RSS {result['peak_rss_mib']:.0f} MiB")
print(f"reference: insightface r50, fp16, ~{reference:.0f} img/s per V100")
EOF
say "gpu_check: OK (logs in $OUT_DIR)"
