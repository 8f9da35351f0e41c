#!/usr/bin/env bash
# The generation engine's benchmark on the GPU machine (device tool, one GPU), detached so that it can outlast one
# call (a 3B decode step compiles for ~95 s, and the issue's sweep runs for many minutes):
#   scripts/gpu_prepare.sh                                   # here, where pip works: mamba-ssm into .device/site
#   run(carry=[".device"], command="bash scripts/gpu_engine.sh start; bash scripts/gpu_engine.sh wait 570")
#   run(command="bash scripts/gpu_engine.sh wait 570")       # as often as needed, each within 30 s of the last
# The chain, in this order (each step's log in the archive, and `m1 bench`'s JSON written after every point, so an
# interrupted run keeps what it measured):
#   ENGINE_TESTS=1: tests/gpu/test_engine_gpu.py (kernels vs references, graphs vs eager) and the kernel tests of
#     the decode step's own Triton kernels (conv-state update, inference gated norm, small-head state update)
#   M1_JOBS, separated by ';': "bench ARGS" runs `m1 bench ARGS`, "profile MODEL BATCH CONTEXT" runs
#     benchmarks/profile_decode.py (uncompiled). Default: session 8's jobs (docs/benchmarks.md): each model at its
#     largest batch at 8k new tokens (M1 at 512; the all-attention model at 128, with its length sweep 1k, 2k at 128),
#     then the batch sweep 8..128 of both with the mean of 3 runs.
#     Session 7's jobs: M1_JOBS="bench --models m1 --batch-sizes 512 $SWEEP --repeats 1;<the same>
#     --mamba-state-dtype model;bench --models m1 --batch-sizes 128 --gen-len 32768 ... --gpu-memory-utilization 0.51"
#     Session 6's jobs: M1_JOBS="bench --models m1 --batch-sizes 256,512 $SWEEP --repeats 3;bench --models llama
#     --batch-sizes 256 $SWEEP --repeats 3;bench --models m1 --batch-sizes 128 --gen-len 16384 ...;profile m1 512 2304"
# Output: $OUT/engine_gpu.tar.gz (logs/: *.log, bench_*.json / .md, status).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
OUT=${OUT:-runs/gpu}
E=/tmp/eng
LOGS=$E/logs
export PYTHONPATH="$E/device_site:$E/repo" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$E/inductor
SWEEP="--gen-len 4096 --warmup 2 --warmup-len 16"
LONG="--warmup 2 --warmup-len 16 --repeats 1"
M1_JOBS=${M1_JOBS:-"bench --models m1 --batch-sizes 512 --gen-len 8192 $LONG;\
bench --models llama --batch-sizes 128 --gen-len 8192 --gen-lens 1024,2048 --length-batch 128 $LONG;\
bench --models m1,llama --batch-sizes 8,16,32,64,128 $SWEEP --repeats 3"}

chain() {
    if [ "${ENGINE_TESTS:-0}" = 1 ]; then
        (cd $E/repo && M1_GPU_REPORT=$LOGS/engine_errors.jsonl timeout 360 python3 -m pytest tests/gpu/test_engine_gpu.py \
            tests/gpu/test_kernels_gpu.py::test_causal_conv1d tests/gpu/test_kernels_gpu.py::test_rmsnorm_gated \
            tests/gpu/test_kernels_gpu.py::test_ssd_step tests/gpu/test_kernels_gpu.py::test_ssd_step_dt_limit \
            -v -p no:cacheprovider -rfE >$LOGS/engine_tests.log 2>&1)
        echo "engine tests: exit $?" >>$LOGS/status
    fi
    local i=0 job kind args
    IFS=';' read -ra jobs <<<"$M1_JOBS"
    for job in "${jobs[@]}"; do
        i=$((i + 1))
        read -r kind args <<<"$job"
        case $kind in
        bench)  # shellcheck disable=SC2086  # a list of arguments
            TORCH_LOGS=recompiles python3 -m m1_plugins.rollout.bench $args --out $LOGS/bench_$i.json >$LOGS/bench_$i.log 2>&1
            echo "$i bench ($args): exit $?, $(grep -c 'Recompiling function' $LOGS/bench_$i.log) recompilations" >>$LOGS/status ;;
        profile)
            read -r model batch context <<<"$args"
            python3 $E/repo/benchmarks/profile_decode.py --model "$model" --batch "$batch" --context "$context" \
                --no-compile >$LOGS/profile_$i.log 2>&1
            echo "$i profile ($args): exit $?" >>$LOGS/status ;;
        *) echo "$i: unknown job '$job'" >>$LOGS/status ;;
        esac
    done
    echo done >>$LOGS/status
}

case ${1:-} in
start)
    rm -rf $LOGS $E/repo && mkdir -p $LOGS $E/repo
    # a later call's working tree lacks .device: the chain reads its own copies
    rm -rf $E/device_site && cp -r .device/site $E/device_site && cp -r m1_plugins benchmarks tests pyproject.toml $E/repo/ ||
        start_failed $LOGS "copying the repository"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    setsid bash "$0" chain >$LOGS/chain.log 2>&1 </dev/null &
    echo "engine benchmark started"
    ;;
chain) chain ;;
wait) follow $LOGS "${2:-500}" engine_gpu.tar.gz "tok/s|Error|Traceback|engine setup|graph replay" ;;
*) echo "usage: $0 start|wait SECONDS" >&2; exit 2 ;;
esac
