#!/usr/bin/env bash
# The main job on its small CPU default, from a fresh machine:
#   1. set up the Axolotl environment (plain pip, locked versions)
#   2. build the offline teacher (SmolLM2-135M-Instruct), convert it to an M1 hybrid, and report its fidelity on the
#      teacher's own greedy answers to held-out prompts (m1 demo)
#   3. write the training data: gsm_symbolic problems with the dataset's worked solutions, and the teacher's own
#      greedy answers to 64 of them (m1 data --teacher)
#   4. align the hybrid's Mamba mixers to the attention layers they replaced (axolotl_configs/small/align_smollm2.yml)
#   5. distil it through Axolotl on the teacher's answers (axolotl_configs/small/distill_smollm2.yml: reverse KL plus
#      cross-entropy on the teacher's tokens, packed rows)
#   6. report every stage against the teacher (runs/demo/report.md) and draw the fidelity curves of the training runs
# Everything lands in runs/demo/; re-running skips finished steps and resumes an interrupted training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh axolotl
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1
export PATH="$PWD/.venvs/axolotl/bin:$PATH"   # axolotl launches `accelerate` by name
m1 demo --workdir runs/demo
[ -f runs/demo/distill.jsonl ] || m1 data --task gsm_symbolic --size 400 --seed 0 --out runs/demo/distill.jsonl
[ -f runs/demo/teacher_train_answers.jsonl ] || m1 data --teacher runs/demo/teacher --task gsm_symbolic --size 64 \
    --seed 0 --max-new-tokens 256 --batch-size 64 --out runs/demo/teacher_train_answers.jsonl
[ -f runs/demo/aligned/model.safetensors ] || axolotl train axolotl_configs/small/align_smollm2.yml
[ -f runs/demo/distill/model.safetensors ] || axolotl train axolotl_configs/small/distill_smollm2.yml
m1 demo --workdir runs/demo
m1 curves --runs runs/demo/aligned runs/demo/distill --out runs/demo/fidelity_curves.png
