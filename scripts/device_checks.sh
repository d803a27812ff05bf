#!/usr/bin/env bash
# Issue 11's GPU checks, in one command on the device machine (its image has torch and CUDA, not tvforge's
# other packages). Prepare here, then run through the device tool:
#   bash scripts/device_wheels.sh                 # .whl/: the missing packages as CPython 3.12 wheels
#   TVFORGE_TEST_ASSETS_DIR=bench/assets-quick ...  # any test using quick_bench_assets builds them there
#   run(command="bash scripts/device_checks.sh", carry=[".whl", "bench/assets-quick"], timeout_s=420)
# Steps, each under its own time limit, a failed one not stopping the rest (their logs in $OUT/log.txt, the
# figures in $OUT/*.json):
#   1. the GPU and the software;
#   2. tests/test_gpu.py: aTLAS, STA and TSV-M jobs through a real API, Redis and a Celery worker on CUDA;
#   3. bench.atlas_step at ViT-B/32 on CUDA: mixed precision at batch 16 and 128, float32 at batch 16;
#   4. bench.spectral_device: TSV-M, Iso-C and Iso-CTS's SVDs on the 16-core CPU against CUDA;
#   5. bench.merge_cost at ViT-B/32 on that machine's CPU and disk (the merges stream on the CPU).
# Checking the script here, without a GPU: PYTHON=.venv/bin/python TVFORGE_DEVICE_CHECK_DEVICE=cpu
# TVFORGE_DEVICE_CHECK_QUICK=1 bash scripts/device_checks.sh (steps 2-4 on the CPU, every size cut down).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tvforge-device-checks}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
DEVICE=${TVFORGE_DEVICE_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TVFORGE_TEST_ASSETS_DIR=bench/assets-quick

if ! "$PYTHON" -c "import celery, fastapi, open_clip, sqlalchemy" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi

if [ -n "${TVFORGE_DEVICE_CHECK_QUICK:-}" ]; then
  ATLAS_SIZES="--steps 1" ATLAS_RUNS=("amp 2 --amp") SPECTRAL_SIZES="--vectors 2 --repeats 1"
  MERGE_SIZES="--counts 2 --repeats 1"
else
  ATLAS_SIZES="--steps 10" ATLAS_RUNS=("amp 16 --amp" "amp 128 --amp" "fp32 16")
  SPECTRAL_SIZES="--vectors 8 --repeats 3" MERGE_SIZES="--counts 2,8,16 --repeats 2"
fi

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, say how it ended
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  echo "=== $name" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - started )) s" | tee -a "$LOG"
}

step environment 60 bash -c "nvidia-smi || true; nproc; free -g; df -h /tmp; $PYTHON -c 'import sys, torch; \
print(sys.version); print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
step gpu_jobs 150 env TVFORGE_CHECK_DEVICE="$DEVICE" TVFORGE_CHECK_OUT="$OUT/gpu_jobs.json" \
  "$PYTHON" -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider
for run in "${ATLAS_RUNS[@]}"; do
  set -- $run  # precision, batch, flag
  step "atlas_step_$1_batch$2" 90 "$PYTHON" -m bench.atlas_step --device "$DEVICE" --batch "$2" $ATLAS_SIZES ${3:-} \
    --out "$OUT/atlas_step_$1_batch$2.json"
done
step spectral_device 90 "$PYTHON" -m bench.spectral_device $SPECTRAL_SIZES --out "$OUT/spectral_device.json"
step merge_cost 180 "$PYTHON" -m bench.merge_cost $MERGE_SIZES \
  --methods task_arithmetic,ties,sta,dare,script --workdir /tmp/tvforge-merge-cost --out "$OUT/merge_cost.json"
tail -n 150 "$LOG"
