#!/usr/bin/env bash
# Set up (first run only) and run the CPU demo: Fashion-MNIST, teacher -> student, comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/relkd demo "$@"
