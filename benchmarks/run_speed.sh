#!/usr/bin/env bash
# The run behind benchmarks/speed.md: `relkd bench speed` for resnet32x4 -> resnet8x4, batch 64,
# CIFAR-100-shaped synthetic data (3x32x32, 100 classes, N = 50000), fp32, CPU, 2 threads.
#
#   benchmarks/run_speed.sh [OUT.jsonl]        (default: ${TMPDIR:-/tmp}/relkd_speed.jsonl)
#   benchmarks/run_speed.sh --cold [OUT.jsonl] (ce and kd only, adds the cold-page-cache cached
#                                               step: the "Cold page cache" run of speed.md)
#   benchmarks/run_speed.sh OUT.jsonl FLAGS... (FLAGS are appended to the command and override
#                                               its settings: a smoke run, not the recorded one)
#
# Prints the date, the machine and the exact command, writes one JSON record per configuration
# to OUT, then the table and the ratios rendered from those records (one run, one process).
# Run it on an otherwise idle machine: anything else on the same cores distorts every number.
# Needs ~8 GiB of free disk (temporary teacher caches, deleted at the end) and ~10 GiB of RAM.
set -euo pipefail
cd "$(dirname "$0")/.."
RELKD=${RELKD:-.venv/bin/relkd}
PY=${PYTHON:-.venv/bin/python}
COLD=0
if [[ ${1:-} == --cold ]]; then
    COLD=1
    shift
fi
OUT=${1:-${TMPDIR:-/tmp}/relkd_speed.jsonl}
shift || true

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: nproc=$(nproc), CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)," \
    "torch $($PY -c 'import torch; print(torch.__version__)'), kernel $(uname -r)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
CMD=("$RELKD" bench speed --teacher resnet32x4 --student resnet8x4)
if ((COLD)); then
    CMD+=(--method ce,kd)
else
    CMD+=(--method ce,kd,dkd,crd,rrd,at)
fi
CMD+=(--batch 64 --steps 40 --warmup 5 --rounds 5 --device cpu
    --precision fp32 --image-size 32 --num-classes 100 --num-train-samples 50000 --threads 2)
if ((COLD)); then
    CMD+=(--cache-variants engine,preloaded,cold --no-data --json)
else
    CMD+=(--cache-variants engine,preloaded --data-workers 0,2 --json)
fi
CMD+=("$@")
echo "command: ${CMD[*]} > $OUT"
"${CMD[@]}" >"$OUT"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$OUT" <<'PYEOF'
import json
import sys

from relkd.bench.speed import format_ratios, format_table, speed_ratios

records = [json.loads(line) for line in open(sys.argv[1])]
print(format_table(records))
print()
print(format_ratios(speed_ratios(records)))
PYEOF
