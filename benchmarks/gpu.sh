#!/usr/bin/env bash
# GPU checks in one go (< 8 minutes on one modern GPU): the step-overhead benchmark at 1e6 and 1e7
# parameters, and a --quick paper run.  Usage: benchmarks/gpu.sh OUT_DIR [DEVICE] [MNIST_DIR]
# With DEVICE=cpu it runs the same script on the CPU (smaller sizes, two experiments), which is
# how it is exercised where no GPU is lent.
set -euo pipefail
out=$(mkdir -p "${1:?usage: benchmarks/gpu.sh OUT_DIR [DEVICE] [MNIST_DIR]}" && cd "$1" && pwd)
device=${2:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)
data=${3:-$here/../shared/data/mnist}
cd "$here"
if [ "$device" = cuda ]; then sizes="1e6 1e7"; only="train activations depths cnn"; else sizes="1e4 1e5"; only="train"; fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 180 python benchmarks/step_overhead.py --device "$device" --sizes $sizes --out "$out/step_overhead.md"
timeout 300 python benchmarks/paper.py --quick --device "$device" --data-dir "$data" --only $only --out "$out"
