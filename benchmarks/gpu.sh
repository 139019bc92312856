#!/usr/bin/env bash
# GPU checks in one go (< 8 minutes on one modern GPU): the step-overhead benchmark at 1e6 and 1e7
# parameters, and a whole --quick paper run (every experiment).  Usage:
#   benchmarks/gpu.sh OUT_DIR [DEVICE] [MNIST_DIR]
# Writes OUT_DIR/step_overhead.md (the rule's own chunk for the device, as a user gets it: 2^20
# rows per network call on a GPU), OUT_DIR/step_overhead-chunk8192.md (the CPU's chunk: on a GPU
# that step is kernel-launch-bound, ~10x slower on an H200), and paper.md, paper-*.png and the cache from
# `paper.py --quick` (results keyed by device, so they never mix with CPU ones).  The paper run
# gets what is left of a 440 s budget (GPU_SH_BUDGET=seconds overrides it); if it is cut off,
# paper.md is still written from the
# finished tasks and lists the rest as not run.  With DEVICE=cpu it runs the same steps on the
# CPU (smaller sizes, the training task only), which is how it is exercised where no GPU is lent.
set -uo pipefail
out=$(mkdir -p "${1:?usage: benchmarks/gpu.sh OUT_DIR [DEVICE] [MNIST_DIR]}" && cd "$1" && pwd)
device=${2:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)
data=${3:-$here/../shared/data/mnist}
cd "$here"
if [ "$device" = cpu ]; then sizes="1e4 1e5"; only=(--only train); else sizes="1e6 1e7"; only=(); fi
status=0
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 120 python benchmarks/step_overhead.py --device "$device" --sizes $sizes \
    --out "$out/step_overhead.md" || { echo "step_overhead: exit $?" >&2; status=1; }
timeout 120 python benchmarks/step_overhead.py --device "$device" --sizes $sizes --chunk 8192 \
    --out "$out/step_overhead-chunk8192.md" || { echo "step_overhead --chunk 8192: exit $?" >&2; status=1; }
left=$((${GPU_SH_BUDGET:-440} - SECONDS)); left=$((left > 60 ? left : 60))
timeout "$left" python benchmarks/paper.py --quick --device "$device" --data-dir "$data" \
    ${only[@]+"${only[@]}"} --out "$out" || { echo "paper.py: exit $? (cut off after ${left}s?)" >&2; status=1; }
# the report from whatever finished (a run cut off by the timeout never reached its own)
python benchmarks/paper.py --quick --report-only --device "$device" --data-dir "$data" \
    --out "$out" > /dev/null || status=1
echo "gpu.sh: ${SECONDS}s in all, results in $out" >&2
exit $status
