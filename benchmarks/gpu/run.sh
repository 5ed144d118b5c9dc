#!/usr/bin/env bash
# The one-GPU check of relkd, ready for the day a GPU is attached; under 8 minutes on one GPU
# (every step has its own time limit, 450 s in all):
#
#   benchmarks/gpu/run.sh [OUT]        # OUT default: benchmarks/gpu/results/<UTC date-time>
#
# 1. the CUDA tests: tests/test_cuda.py (bf16, fp16 with the gradient scaler, torch.compile,
#    channels_last, the teacher cache preloaded onto the device, on-device data), plus
#    tests/engine/test_precision.py and tests/data/test_memory.py, which run on the GPU when
#    there is one (train.device auto);
# 2. `relkd bench speed` resnet32x4 -> resnet8x4 at batch 64 on synthetic data: ce, kd (online
#    and cached teacher), crd, rrd; fp32 and bf16; compile off, then on; ms/step, images/s and
#    peak GPU memory per configuration;
# 3. a 1-GPU torchrun run of a short training config (configs/fashion_mnist/ce.yaml, 2 epochs on
#    a small synthetic set in Fashion-MNIST's format: nothing is downloaded).
#
# Results: OUT/summary.json and OUT/summary.md (benchmarks/gpu/summarize.py), next to the raw
# logs. Exit status 1 when a step failed. Without CUDA it writes a summary saying so, prints
# "skipped" and exits 0.
set -u -o pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-benchmarks/gpu/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
SUM=(benchmarks/gpu/summarize.py "$OUT")

if ! "$PY" -c "import torch" 2>"$OUT/import.log"; then
    echo "benchmarks/gpu/run.sh: $PY cannot import torch (see $OUT/import.log)" >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" "${SUM[@]}" --skipped "no CUDA device (torch.cuda.is_available() is False)"
    echo "benchmarks/gpu/run.sh: no CUDA device: GPU check skipped (exit 0)"
    exit 0
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log and exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" >"$OUT/$name.rc.json"
    echo "   exit $rc after $((SECONDS - t0)) s"
}

# 1. CUDA tests
step tests 150 "$PY" -m pytest tests/test_cuda.py tests/engine/test_precision.py \
    tests/data/test_memory.py -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml"

# 2. speed: compile off first (fast), then on (compilation takes most of its time)
SPEED=(-m relkd bench speed --teacher resnet32x4 --student resnet8x4 --batch 64
    --method ce,kd,crd,rrd --precision fp32,bf16 --device cuda --no-data --json
    --steps 30 --warmup 10 --rounds 3)
step speed_eager 80 "$PY" "${SPEED[@]}" --compile off
step speed_compiled 170 "$PY" "${SPEED[@]}" --compile on

# 3. torchrun, one process on one GPU, on a synthetic Fashion-MNIST-format set
"$PY" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import make_fmnist
make_fmnist(Path(sys.argv[1]), n_train=2048, n_test=512)
" "$OUT/data"
step torchrun 50 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m relkd train configs/fashion_mnist/ce.yaml "data.root=$OUT/data" data.train_subset=null \
    train.epochs=2 train.device=cuda train.progress=false train.tensorboard=false \
    "output_dir=$OUT/torchrun" name=ce

"$PY" "${SUM[@]}"
