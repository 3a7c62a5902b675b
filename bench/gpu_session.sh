#!/usr/bin/env bash
# Everything a lent GPU should check, in one run of about 8 minutes: the kernel-facing test
# suite natively on CUDA, then every benchmark. Results go to $OUT (the device tool's output
# folder, which returns at most 8 files) or ./gpu-results: the Markdown tables and the step
# log as files, everything (logs, JSON) also in gpu-results.tgz.
#
#   bash bench/gpu_session.sh                 # on the GPU machine, from the repo root
#
# The GPU image has torch/triton and the other dependencies but no network: instead of
# installing, the package is laid out in a temporary folder (kernels/ mapped to
# cobkern/kernels, as the wheel does) and put on PYTHONPATH. torch-pruning is not there;
# its tests skip.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
FINAL=${OUT:-$REPO/gpu-results}
mkdir -p "$FINAL"
OUT=$(mktemp -d)  # collected here, packed into $FINAL at the end
SITE=$(mktemp -d)
cp -r "$REPO/cobkern" "$SITE/cobkern"
cp -r "$REPO/kernels" "$SITE/cobkern/kernels"
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
cd "$SITE"  # the repo's own cobkern/ (without kernels/) must not shadow the copy
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.log"; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

step "tests on CUDA"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x \
  "$REPO/tests/test_tsra_kernels.py" "$REPO/tests/test_tsra_properties.py" \
  "$REPO/tests/test_tsra_compile.py" "$REPO/tests/test_covariance.py" \
  "$REPO/tests/test_cob.py" "$REPO/tests/test_pruning.py" "$REPO/tests/test_models.py" \
  2>&1 | tail -40 | tee "$OUT/tests.log"

step "TSRA kernels vs eager / torch.compile / copy ceiling"
timeout 200 python3 "$REPO/bench/bench_tsra.py" --out "$OUT" 2>&1 | tail -60 | tee "$OUT/bench_tsra.log"

step "calibration: streaming vs materialising"
timeout 90 python3 "$REPO/bench/bench_calibration.py" --out "$OUT" 2>&1 | tail -30 \
  | tee "$OUT/bench_calibration.log"

step "training throughput"
timeout 120 python3 "$REPO/bench/bench_training.py" --out "$OUT/bench_training" 2>&1 \
  | tail -30 | tee "$OUT/bench_training.log"

step done
tar -czf "$FINAL/gpu-results.tgz" -C "$OUT" .
cp "$OUT"/*.md "$OUT/steps.log" "$OUT/environment.txt" "$OUT/tests.log" "$FINAL/"
