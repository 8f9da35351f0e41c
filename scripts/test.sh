#!/usr/bin/env bash
# Set up both environments (if needed) and run the CPU test suite in each. GPU tests (marker `gpu`)
# are skipped here with their reason; they run on the GPU machine via scripts/gpu_run.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
status=0
for env in axolotl verl; do
  echo "=== tests in .venvs/$env ==="
  .venvs/$env/bin/python -m pytest tests "$@" || status=1
done
exit $status
