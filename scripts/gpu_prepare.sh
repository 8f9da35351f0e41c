#!/usr/bin/env bash
# Prepare, on a machine with pip network access, what the GPU machine lacks: a pure-Python copy of
# mamba-ssm 2.3.2.post1 (its Mamba-2 ops are Triton kernels; no CUDA build needed) in .device/site/.
# Idempotent: re-running it with the copy in place only re-verifies it.
#
# On the GPU machine:  PYTHONPATH=.device/site:. python ...   (see scripts/gpu_run.sh)
# m1_plugins.ops._kernels installs the `selective_scan_cuda` stub that mamba_ssm/__init__.py needs.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=2.3.2.post1
DEST=.device/site
# pip runs the sdist's setup.py for its metadata: that Python needs torch, setuptools and wheel (a project venv has
# them); without build isolation, so that pip does not fetch torch as a build dependency
PY=${PYTHON:-}
for candidate in .venvs/verl/bin/python .venvs/axolotl/bin/python python3; do
    [ -n "$PY" ] && break
    command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch, setuptools, wheel" 2>/dev/null && PY=$candidate
done
[ -n "$PY" ] || { echo "need a Python with torch, setuptools and wheel (set PYTHON=...)" >&2; exit 1; }
export MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE  # setup.py: no prebuilt-wheel download, no nvcc
export PYTHONDONTWRITEBYTECODE=1

if [ ! -f "$DEST/mamba_ssm/__init__.py" ] || ! grep -q "__version__ = \"$VERSION\"" "$DEST/mamba_ssm/__init__.py"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # the sdist (the registry has no wheel for it); only the mamba_ssm package directory is kept
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$tmp" "mamba-ssm==$VERSION"
    tar -xzf "$tmp"/mamba_ssm-*.tar.gz -C "$tmp"
    rm -rf "$DEST/mamba_ssm"
    mkdir -p "$DEST"
    cp -r "$tmp/mamba_ssm-$VERSION/mamba_ssm" "$DEST/"
    cp "$tmp/mamba_ssm-$VERSION/LICENSE" "$DEST/mamba_ssm/LICENSE" 2>/dev/null || true
    find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
    echo "mamba_ssm $VERSION extracted into $DEST"
else
    echo "mamba_ssm $VERSION already in $DEST"
fi

# verify: the copy (not the venv's install) imports, stub included, and its Triton ops resolve
PYTHONPATH="$DEST:." "$PY" - <<'PY'
import os
import m1_plugins.ops._kernels as k
k._import_mamba_ssm()
import mamba_ssm
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn  # noqa: F401
here = os.path.abspath(".device/site")
assert os.path.abspath(mamba_ssm.__file__).startswith(here), f"imported {mamba_ssm.__file__}, not the copy in {here}"
print(f"ok: mamba_ssm {mamba_ssm.__version__} from {os.path.dirname(mamba_ssm.__file__)}")
PY
echo "size of .device: $(du -sh .device | cut -f1) (carried to the GPU machine: the device tool allows 64 MiB with the repo)"
