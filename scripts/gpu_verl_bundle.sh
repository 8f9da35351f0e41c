#!/usr/bin/env bash
# Packs what scripts/gpu_verl.sh needs on the GPU machine and cannot install there: VeRL 0.9.1, Ray 2.60 and their
# Python dependencies missing from that machine's image, math-verify, and the offline teacher's GGUF. Installed
# into one folder, trimmed (Ray's Java jars, RLlib/Tune/Train/Serve/Data and the dashboard's web client are never
# loaded by VeRL), xz-compressed and split into .gpu/b1 and .gpu/b2: 60 MiB each, so each part plus the repository
# fits in one device call (64 MiB). Needs ../shared/device/{verl-wheels,smollm2-parts}.sh and the verl venv
# (Python 3.12, as on the GPU machine). Takes about 4 minutes, mostly xz.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
PY=.venvs/verl/bin/python
bash ../shared/device/verl-wheels.sh >/dev/null
bash ../shared/device/smollm2-parts.sh >/dev/null  # the GGUF's parts and the gguf wheel
mkdir -p .whl/extra && rm -f .whl/extra/*
# imported on VeRL's agent-loop path or by the reward, and not in the GPU image (versions as in constraints/verl.txt)
dl .whl/extra annotated-types==0.8.0 cachetools==8.0.1 colorful==0.5.8 fastapi==0.165.0 pydantic==2.14.3 \
    pydantic_core==2.50.4 sniffio==1.3.1 starlette==1.10.0 torchdata==0.11.0 typing-inspection==0.4.5 uvicorn==0.54.0 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 opentelemetry-api==1.45.2  # fastapi imports opentelemetry

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cat .whl/part1/ray.whl.part.* .whl/part2/ray.whl.part.* >"$stage/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
$PY -m pip install -q --no-deps --no-compile --no-build-isolation --target "$stage/site" "$stage"/ray-*.whl \
    .whl/part2/*.whl .whl/part2/*.tar.gz .whl/extra/*.whl .whl/g2/gguf-*.whl
(cd "$stage/site/ray" && rm -rf jars rllib tune train serve data llm dashboard/client/build &&
    mkdir -p dashboard/client/build/static && echo "<html></html>" >dashboard/client/build/index.html &&
    touch dashboard/client/build/favicon.ico)  # the dashboard refuses to start without a build directory
find "$stage/site" -name __pycache__ -prune -exec rm -rf {} +
teacher_gguf "$stage/g"
tar -cf - -C "$stage" site g | xz -T2 -9 >"$stage/bundle.tar.xz"
mkdir -p .gpu/b1 .gpu/b2 && rm -f .gpu/b1/* .gpu/b2/*
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
split -n 2 -d "$stage/bundle.tar.xz" .gpu/b1/bundle.part.
mv .gpu/b1/bundle.part.01 .gpu/b2/
du -sh .gpu/b1 .gpu/b2

# the data: GRPO train/val parquet and the eval set (two-term arithmetic, 1-2 digit operands, as docs/eval.md's CPU run)
M1=.venvs/verl/bin/m1
mkdir -p .gpu/data && rm -f .gpu/data/*
$M1 verl-data --benchmark "rg:basic_arithmetic,size=512,seed=1,min_terms=2,max_terms=2,min_digits=1,max_digits=2" \
    --out .gpu/data/train.parquet
$M1 verl-data --benchmark "rg:basic_arithmetic,size=64,seed=10000,min_terms=2,max_terms=2,min_digits=1,max_digits=2" \
    --split test --out .gpu/data/val.parquet
$PY - <<'PY'
import json
from m1_plugins.eval.benchmarks import load_benchmark
problems = load_benchmark("rg:basic_arithmetic,size=100,seed=0,min_terms=2,max_terms=2,min_digits=1,max_digits=2")
with open(".gpu/data/arith.jsonl", "w") as f:
    for p in problems:
        f.write(json.dumps({"id": p.problem_id, "problem": p.problem, "answer": p.answer}) + "\n")
PY
