#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,eval,video
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
