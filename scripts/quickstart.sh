#!/usr/bin/env bash
# The digits quickstart from a fresh machine (CPU is enough; about 3-5 minutes on 2 cores):
# create .venv, install torch (CPU wheel, pinned in scripts/setup_env.sh) and fewstep with the `eval` extra, then
# LCM-distill the shipped digits teacher and print the teacher-vs-student table (docs/quickstart.md).
# Extra arguments go to `fewstep quickstart`, e.g.:
#   bash scripts/quickstart.sh --recipe quickstart/digits_flow_lcm
#   bash scripts/quickstart.sh train.max_steps=300 --num-images 500
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup_env.sh eval
echo "environment ready in $((SECONDS - start)) s"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/fewstep quickstart "$@"
echo "quickstart finished in $((SECONDS - start)) s (setup included)"
