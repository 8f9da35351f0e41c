#!/usr/bin/env bash
# The main job on its small CPU default, from a fresh machine: set up the environment, build the
# offline teacher (SmolLM2-135M-Instruct), convert it to an M1 hybrid, and write a fidelity report
# to runs/demo/report.md. Re-running skips finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh axolotl
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1
.venvs/axolotl/bin/m1 demo --workdir runs/demo "$@"
