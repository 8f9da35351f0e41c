"""Resolve the optional CUDA kernels once, and pick the backend for a tensor's device.

Backends: "reference" (pure PyTorch, any device) and "cuda" (mamba-ssm Triton kernels for the scan,
the state update and the gated norm; causal-conv1d's CUDA conv when installed, else our own conv).
"""

import importlib
import logging
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cuda")
KERNELS_INSTALL = (
    'pip install "m1-plugins[kernels]"  (mamba-ssm and causal-conv1d; see the README for a '
    "Python-only build of mamba-ssm that needs no CUDA compiler)"
)


@dataclass(frozen=True)
class Kernels:
    chunk_scan: Callable
    state_update: Callable
    rmsnorm_gated: Callable
    conv1d: Optional[Callable]  # causal_conv1d_fn, None when causal-conv1d is not installed
    conv1d_update: Optional[Callable]


def _import_mamba_ssm():
    try:
        return importlib.import_module("mamba_ssm")
    except ImportError as err:
        if "selective_scan_cuda" not in str(err):
            raise
    # mamba_ssm/__init__.py imports the Mamba-1 CUDA extension unconditionally; a build without CUDA
    # extensions (MAMBA_SKIP_CUDA_BUILD=TRUE) lacks it, yet its Mamba-2 Triton kernels, all we use, work.
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    return importlib.import_module("mamba_ssm")


_UNRESOLVED = object()
_kernels = _UNRESOLVED


def load_kernels() -> Optional[Kernels]:
    """The CUDA kernels, or None (with one warning naming the install command) when unavailable.

    Cached in a module global rather than with functools.cache: torch.compile traces through a functools.cache
    wrapper into the import machinery (a graph break in every Mamba layer), but reads a global as a constant."""
    global _kernels
    if _kernels is _UNRESOLVED:
        _kernels = _load_kernels()
    return _kernels


def _load_kernels() -> Optional[Kernels]:
    if not torch.cuda.is_available():
        return None
    try:
        _import_mamba_ssm()
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        logger.warning("mamba-ssm kernels unavailable (%s); using the PyTorch reference. Install: %s", err, KERNELS_INSTALL)
        return None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except ImportError:
        causal_conv1d_fn = causal_conv1d_update = None
        logger.info("causal-conv1d not installed; using m1_plugins' own boundary-aware conv on CUDA")
    # opaque to torch.compile (e.g. Axolotl's torch_compile): dynamo cannot trace these kernels' launchers, so it
    # breaks the graph around them instead of failing (the engine's decode step uses ops/inference_ops.py instead)
    kernels = (mamba_chunk_scan_combined, selective_state_update, rmsnorm_fn, causal_conv1d_fn, causal_conv1d_update)
    return Kernels(*(None if k is None else torch.compiler.disable(k) for k in kernels))


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map the config's `mamba_kernels` ("auto" | "reference" | "cuda") to the backend for `device`."""
    if requested not in BACKENDS:
        raise ValueError(f"mamba_kernels must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    if device.type != "cuda":
        if requested == "cuda":
            raise ValueError(
                f"mamba_kernels='cuda' needs the model on a CUDA device, but it is on {device}. "
                "Move the model to a GPU, or set mamba_kernels='auto' (or 'reference') to use the PyTorch path."
            )
        return "reference"
    if load_kernels() is None:
        if requested == "cuda":
            raise ImportError(f"mamba_kernels='cuda' but the mamba-ssm Triton kernels cannot be loaded. Install: {KERNELS_INSTALL}")
        return "reference"
    return "cuda"


MAMBA2_TRITON_MODULES = ("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_combined", "ssd_state_passing",
                         "layernorm_gated", "selective_state_update")


def mamba_autotuners(modules=MAMBA2_TRITON_MODULES) -> list:
    """Every Triton Autotuner in the given mamba_ssm.ops.triton modules (for benchmarks and tests that
    precompile or pin kernel configs)."""
    from triton.runtime.autotuner import Autotuner

    _import_mamba_ssm()
    found = {}
    for name in modules:
        module = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
        for value in vars(module).values():
            fn, depth = value, 0
            while fn is not None and depth < 5:  # autotuners may be wrapped (heuristics, jit)
                if isinstance(fn, Autotuner):
                    found[id(fn)] = fn
                    break
                fn, depth = getattr(fn, "fn", None), depth + 1
    return list(found.values())
