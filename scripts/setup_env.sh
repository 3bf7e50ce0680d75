#!/usr/bin/env bash
# Create .venv and install fewstep with the given extras. Used by quickstart.sh and test.sh.
# torch is installed first and pinned only here (not in the package metadata), so a GPU user keeps their own build:
# set FEWSTEP_TORCH to another requirement (e.g. "torch>=2.6") to override.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-eval}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --disable-pip-version-check -q "${FEWSTEP_TORCH:-torch==2.13.0}"
fi
.venv/bin/pip install --disable-pip-version-check -q -e ".[${extras}]"
