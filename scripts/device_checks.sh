#!/usr/bin/env bash
# Issue 11's GPU checks on the device machine (its image has torch and CUDA, not tvforge's other packages, and no
# network). Prepare here, then run through the device tool, carrying what was prepared:
#   bash scripts/device_wheels.sh   # .whl/: the missing packages as CPython 3.12 wheels
#   # bench/assets-quick/: the quality benchmark's --quick assets (TVFORGE_TEST_ASSETS_DIR=bench/assets-quick
#   # with any test that uses them, e.g. tests/test_gpu.py TVFORGE_CHECK_DEVICE=cpu)
#   run(command="bash scripts/device_checks.sh", carry=[".whl", "bench/assets-quick"], timeout_s=420)
#   run(command="bash scripts/device_checks.sh merge_cost", carry=[".whl"], timeout_s=200)  # then, if time is left
# Steps (the arguments; by default every one but merge_cost), each under its own time limit (together 370 s at
# most, with the install), a failed one not stopping the rest; logs in $OUT/log.txt, figures in $OUT/*.json (7
# files at most):
#   environment      the GPU and the software
#   gpu_jobs         tests/test_gpu.py: aTLAS, STA and TSV-M jobs through a real API, Redis and Celery worker on CUDA
#   atlas_step       bench.atlas_step at ViT-B/32: mixed precision at batch 16 and 128, float32 at batch 16; each with
#                    aTLAS x 64 partitions beside the other variants
#   spectral_device  bench.spectral_device: TSV-M's, Iso-C's and Iso-CTS's SVDs on the 16-core CPU and on CUDA
#   merge_cost       bench.merge_cost at ViT-B/32 on that machine's CPUs and disk (the merges stream on the CPU)
# Checking the script here, without a GPU: PYTHON=.venv/bin/python TVFORGE_DEVICE_CHECK_DEVICE=cpu
# TVFORGE_DEVICE_CHECK_QUICK=1 bash scripts/device_checks.sh environment gpu_jobs atlas_step spectral_device
# merge_cost (every size cut down).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tvforge-device-checks}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
DEVICE=${TVFORGE_DEVICE_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
STEPS=${*:-environment gpu_jobs atlas_step spectral_device}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TVFORGE_TEST_ASSETS_DIR=bench/assets-quick

LIMIT_SCALE=1
if [ -n "${TVFORGE_DEVICE_CHECK_QUICK:-}" ]; then  # on 2 CPU cores a ViT-B/32 step takes longer than on a GPU
  LIMIT_SCALE=3 ATLAS_SIZES="--steps 1" ATLAS_RUNS=("amp 2 --amp") SPECTRAL_SIZES="--vectors 2 --repeats 1"
  MERGE_SIZES="--counts 2 --repeats 1"
else
  ATLAS_SIZES="--steps 10" ATLAS_RUNS=("amp 16 --amp" "amp 128 --amp" "fp32 16")
  SPECTRAL_SIZES="--vectors 8 --repeats 3" MERGE_SIZES="--counts 2,16 --repeats 1"
fi

if ! "$PYTHON" -c "import celery, fastapi, httptools, open_clip, sqlalchemy" 2>/dev/null; then
  timeout 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
fi
# Whatever is still missing shows here, before any step spends time on it.
"$PYTHON" -c "import app.server, app.main, worker.tasks, bench.merge_cost, bench.quality.run" \
  || { echo "tvforge does not import"; exit 1; }

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, say how it ended
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) started rc
  shift 2
  started=$(date +%s)
  echo "=== $name" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - started )) s" | tee -a "$LOG"
}

for wanted in $STEPS; do
  case $wanted in
    environment)
      step environment 20 bash -c "nvidia-smi || true; nproc; free -g; df -h /tmp; $PYTHON -c 'import sys, torch; \
print(sys.version); print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'" ;;
    gpu_jobs)  # pytest's own timeout ends a stuck test inside the step, so the stack's processes are torn down
      step gpu_jobs 120 env TVFORGE_CHECK_DEVICE="$DEVICE" TVFORGE_CHECK_REQUIRE_CUDA=1 \
        TVFORGE_CHECK_OUT="$OUT/gpu_jobs.json" "$PYTHON" -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider \
        -o timeout=100 ;;
    atlas_step)
      for run in "${ATLAS_RUNS[@]}"; do
        set -- $run  # precision, batch, flag
        step "atlas_step_$1_batch$2" 40 "$PYTHON" -m bench.atlas_step --device "$DEVICE" --batch "$2" \
          --partitions 64 $ATLAS_SIZES ${3:-} --out "$OUT/atlas_step_$1_batch$2.json"
      done ;;
    spectral_device)
      step spectral_device 50 "$PYTHON" -m bench.spectral_device $SPECTRAL_SIZES --out "$OUT/spectral_device.json" ;;
    merge_cost)
      step merge_cost 170 "$PYTHON" -m bench.merge_cost $MERGE_SIZES --methods task_arithmetic,ties,sta,script \
        --workdir /tmp/tvforge-merge-cost --out "$OUT/merge_cost.json" ;;
    *) echo "unknown step $wanted"; exit 2 ;;
  esac
done
grep -v "it/s\]" "$LOG" | tail -n 150
