#!/usr/bin/env bash
# The GPU validation and benchmark in one command, run from the repository root on the GPU machine (one H100 or
# H200, no network): the CUDA-backend tests (tests/gpu) and the training-throughput benchmark, in under 9.5 min.
#
#   scripts/gpu_prepare.sh        # first, on a machine with pip access: mamba-ssm's sources into .device/site
#   scripts/gpu_run.sh            # then on the GPU machine (the device tool: carry .device); outputs go to $OUT
#
# Outputs in $OUT (default runs/gpu): gpu_tests.log (environment + pytest -v), gpu_errors.md / .jsonl (every checked
# tensor's kernel error vs its bound), train_throughput.json / .md / .log.
#
# While the tests run, the benchmark's Triton kernels (every autotune config of the two 3B mixer layouts) compile
# in parallel background processes into Triton's on-disk cache; the benchmark itself starts after the tests, on
# a quiet GPU. Limits: M1_GPU_RUN_LIMIT (total seconds, default 570), M1_GPU_TEST_LIMIT (pytest, default 280).
# M1_BENCH_ARGS adds benchmark arguments (e.g. "--models llama,m1 --steps 5"; "--tiny" for a CPU smoke test).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
LIMIT=${M1_GPU_RUN_LIMIT:-570}
TEST_LIMIT=${M1_GPU_TEST_LIMIT:-280}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
left() { echo $((LIMIT - (SECONDS - START))); }

export PYTHONPATH="$PWD/.device/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export M1_GPU_REPORT="$OUT/gpu_errors.jsonl"
rm -f "$M1_GPU_REPORT"
TMP=$(mktemp -d)
LOG=$OUT/gpu_tests.log

{
    echo "# scripts/gpu_run.sh, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    echo "cpus: $(nproc)"
    [ -f .device/site/mamba_ssm/__init__.py ] || echo "WARNING: no .device/site/mamba_ssm: run scripts/gpu_prepare.sh where pip works, and carry .device"
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "triton", "einops", "pytest", "xdist", "pytest_timeout", "tqdm"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as err:
        print(f"{name} MISSING ({err!r})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
from m1_plugins.ops import load_kernels
from m1_plugins.ops._kernels import _import_mamba_ssm
k = load_kernels()
m = _import_mamba_ssm()
print("mamba_ssm", m.__version__, "from", m.__file__)
print("kernels:", "LOADED" if k is not None else "NOT LOADED", "| causal-conv1d:", "yes" if k and k.conv1d else "no (m1_plugins' conv)")
EOF
} 2>&1 | tee "$LOG"

# 1. the benchmark's Triton precompilation, in the background (CPU-bound compiles; the tests use the GPU lightly)
timeout 320 "$PY" benchmarks/train_throughput.py ${M1_BENCH_ARGS:-} --precompile-only --precompile-workers 8 --precompile-timeout 300 \
    --out "$TMP/precompile.json" >"$TMP/precompile.log" 2>&1 &
PRE=$!

# 2. the tests: parallel workers when pytest-xdist is there (each compiles its own Triton specialisations)
PYTEST_ARGS=(tests/gpu -v -m gpu -p no:cacheprovider -rfEsxX)
if "$PY" -c "import xdist, sys; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null; then
    PYTEST_ARGS+=(-n "${M1_GPU_TEST_WORKERS:-6}" --dist worksteal)
elif "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_ARGS+=(-n "${M1_GPU_TEST_WORKERS:-6}")
fi
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 200)
echo "+ pytest ${PYTEST_ARGS[*]}   (limit ${TEST_LIMIT}s)" | tee -a "$LOG"
T0=$SECONDS
timeout "$TEST_LIMIT" "$PY" -m pytest "${PYTEST_ARGS[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
echo "pytest exit code $RC$([ "$RC" = 124 ] && echo ' (TIMED OUT)') after $((SECONDS - T0)) s" | tee -a "$LOG"

# 3. every checked tensor: kernel error vs bound, worst first
"$PY" - "$M1_GPU_REPORT" "$OUT/gpu_errors.md" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(l) for l in src.read_text().splitlines()] if src.exists() else []
checks = [r for r in rows if "bound" in r]
checks.sort(key=lambda r: -(r["err"] / r["bound"] if r["bound"] else float("inf")))
lines = [f"{len(checks)} tensors checked, {sum(not r['ok'] for r in checks)} over their bound "
         "(bound = 2 x same-precision PyTorch error + atol; ratio = error / bound, worst first)", "",
         "| test | tensor | max abs err | same-precision err | bound | ratio | ok |", "|---|---|---|---|---|---|---|"]
for r in checks:
    ratio = r["err"] / r["bound"] if r["bound"] else float("inf")
    lines.append(f"| {r['test']} | {r['tensor']} | {r['err']:.3e} | {r['err_pt']:.3e} | {r['bound']:.3e} | {ratio:.2f} | "
                 f"{'yes' if r['ok'] else '**NO**'} |")
other = [r for r in rows if "bound" not in r]
if other:
    lines += ["", "Other records:", ""] + [f"- {json.dumps(r)}" for r in other]
dst.write_text("\n".join(lines) + "\n")
print("\n".join(lines[:3] + lines[4:16]))
EOF

# 4. the benchmark, once the precompilation is done (it has its own limits)
wait "$PRE"
echo "precompile exit code $? ($(tail -c 400 "$TMP/precompile.log" | tr '\n' ' '))" | tee -a "$LOG"
BENCH=$(($(left) - 10))
if [ "$BENCH" -lt 90 ]; then
    echo "only ${BENCH}s left: benchmark skipped" | tee "$OUT/train_throughput.log"
    exit 1
fi
echo "+ benchmark (limit ${BENCH}s)" | tee -a "$LOG"
{ cat "$TMP/precompile.log"; echo; } >"$OUT/train_throughput.log"
timeout "$BENCH" "$PY" benchmarks/train_throughput.py ${M1_BENCH_ARGS:-} --no-precompile --precompile-info "$TMP/precompile.json" \
    --time-budget $((BENCH - 100)) --out "$OUT/train_throughput.json" --md "$OUT/train_throughput.md" 2>&1 |
    tee -a "$OUT/train_throughput.log"
echo "benchmark exit code ${PIPESTATUS[0]}; total $((SECONDS - START)) s" | tee -a "$LOG" "$OUT/train_throughput.log"
exit "$RC"
