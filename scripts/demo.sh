#!/usr/bin/env bash
# The main job on its small CPU default, from a fresh machine:
#   1. set up the Axolotl environment (plain pip, locked versions)
#   2. build the offline teacher (SmolLM2-135M-Instruct), convert it to an M1 hybrid, report its fidelity
#   3. distil the hybrid through Axolotl (axolotl_configs/small/distill_smollm2.yml: reverse KL, packed rows)
#   4. report the distilled hybrid's fidelity to the teacher on the same held-out conversations
# Everything lands in runs/demo/; re-running skips finished steps and resumes an interrupted training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh axolotl
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1
export PATH="$PWD/.venvs/axolotl/bin:$PATH"   # axolotl launches `accelerate` by name
m1 demo --workdir runs/demo
[ -f runs/demo/distill.jsonl ] || m1 data --task gsm_symbolic --size 400 --seed 0 --out runs/demo/distill.jsonl
[ -f runs/demo/distill/model.safetensors ] || axolotl train axolotl_configs/small/distill_smollm2.yml
m1 report --teacher runs/demo/teacher --student runs/demo/distill --out runs/demo/report_distilled.json
