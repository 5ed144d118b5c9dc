#!/usr/bin/env bash
# Create .venv and install relkd with what it needs. Idempotent: a second run installs nothing.
# Usage: scripts/setup.sh [extra]   (extra: test | demo)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-demo}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.relkd-installed-$extra-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # torch first and pinned: an unpinned resolve could pull a multi-GB build from the registry
  # instead of the release this project is tested with (see DEVELOPERS.md).
  .venv/bin/pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
  if [ "$extra" = "test" ]; then
    .venv/bin/pip install --disable-pip-version-check -q -e ".[test,export]" 2>&1 | grep -v "is ignored" || true
  else
    .venv/bin/pip install --disable-pip-version-check -q -e ".[tensorboard]" 2>&1 | grep -v "is ignored" || true
  fi
  .venv/bin/python -c "import relkd, torch; print('[setup] relkd', relkd.__version__, 'torch', torch.__version__)"
  touch "$stamp"
fi
# Fashion-MNIST for the demo: Debian's package when we may install it, else relkd can download it.
if [ "$extra" = "demo" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
      || echo "[setup] could not install dataset-fashion-mnist; run the demo with --root or let it download"
  fi
fi
