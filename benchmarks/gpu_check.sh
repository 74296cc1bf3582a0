#!/usr/bin/env bash
# The GPU path in one run of at most 8 minutes, on a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh            # figures under $OUT (default runs/gpu_check)
#
# 1. the card, the driver and torch's CUDA;
# 2. the tests that need CUDA (those whose name or parameters say cuda);
# 3. one SVI step on the GPU against the hand-written reference, at B = 32, 256 and 1024:
#    sequences per second, peak GPU memory and the host-device synchronisations in a step
#    (benchmarks/svi_step.py counts them);
#    and, with the guide's steps compiled (torch.compile), at B = 256, T = 50, with the compile time;
# 4. a short `pyro-worldmodel train --device cuda` and `loop --device cuda --smoke`;
# 5. data-parallel throughput on the GPU (benchmarks/scale.py is CPU-only: not run here).
# Each step has its own time limit, so that one that hangs leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
run() {  # run NAME SECONDS COMMAND...: the output to $OUT/NAME.txt and the screen
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}
run gpu 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python -c "import torch; assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
run tests 120 python -m pytest -q -p no:cacheprovider -k cuda tests/
run svi_step 120 python benchmarks/svi_step.py --device cuda --batch 32 256 1024
run compiled 90 python benchmarks/svi_step.py --device cuda --batch 256 --T 50 --compile --no-stock --memory-batch 256
run train 60 pyro-worldmodel train --device cuda --preset smoke --episodes 12 --out "$OUT/train" --overwrite --seed 0
run loop 60 pyro-worldmodel loop --device cuda --smoke --out "$OUT/loop" --overwrite --seed 0
