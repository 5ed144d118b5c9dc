#!/usr/bin/env bash
# Set up (first run only), then lint and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/ruff check src tests benchmarks scripts
# One BLAS/OpenMP thread per worker: two workers on two cores must not oversubscribe them.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest -n 2 --durations=15 "$@"
