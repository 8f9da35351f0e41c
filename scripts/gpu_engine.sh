#!/usr/bin/env bash
# The generation engine's GPU checks and throughput benchmark in one device call (run scripts/gpu_prepare.sh
# first, where pip works, and carry .device). Outputs in $OUT (default runs/gpu):
#   engine_tests.log, engine_errors.jsonl   tests/gpu/test_engine_gpu.py (kernels vs references, graphs vs eager)
#   bench_<model>.json / .md / .log         m1 bench per model, with torch.compile's recompilation log
# M1_BENCH_MODELS (default "m1 llama"), M1_BENCH_ARGS (default: batch 128 and 512, generation 4096, one short
# warm-up, one timed run) and M1_BENCH_LIMIT (seconds per model, default 240) shape the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.device/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export M1_GPU_REPORT="$OUT/engine_errors.jsonl"
PY=${PYTHON:-python3}
timeout "${M1_TEST_LIMIT:-240}" "$PY" -m pytest tests/gpu/test_engine_gpu.py -v -p no:cacheprovider -rfE 2>&1 |
    tee "$OUT/engine_tests.log" | tail -15
for model in ${M1_BENCH_MODELS:-m1 llama}; do
    # shellcheck disable=SC2086  # M1_BENCH_ARGS is a list of arguments
    TORCH_LOGS=recompiles timeout "${M1_BENCH_LIMIT:-240}" "$PY" -m m1_plugins.rollout.bench --models "$model" \
        ${M1_BENCH_ARGS:---batch-sizes 128,512 --gen-len 4096 --warmup 1 --warmup-len 16 --repeats 1} \
        --out "$OUT/bench_$model.json" >"$OUT/bench_$model.log" 2>&1
    tail -8 "$OUT/bench_$model.log"
    echo "$model: $(grep -c 'Recompiling function' "$OUT/bench_$model.log") torch.compile recompilations"
done
