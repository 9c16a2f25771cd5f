#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (under 5 minutes): the CUDA tests and the
# quick benchmark on the device. Results go to ${OUT:-out/gpu} (gitignored /out/).
# Usage, from the repository root, with the project installed (requirements/dev.txt or
# a CUDA build of torch of the tested version):   bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
python=${PYTHON:-python}
"$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
start=$(date +%s)
timeout 240 "$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider -o addopts="" \
  --junitxml="$out/cuda-tests.xml" 2>&1 | tee "$out/cuda-tests.txt"
timeout 240 "$python" -m benchmarks --device cuda --quick --out "$out/bench" 2>&1 \
  | tee "$out/bench.txt"
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $out"
