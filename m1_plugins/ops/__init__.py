"""The Mamba-2 math behind one small interface: each op `foo` dispatches on `backend` to a CUDA
kernel or to `foo_ref`, its pure-PyTorch twin with the same signature (the executable spec)."""

from ._kernels import BACKENDS, load_kernels, resolve_backend
from .conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref, last_conv_inputs
from .norm import rmsnorm_gated, rmsnorm_gated_ref
from .ssd import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_step, ssd_step_ref, ssd_varlen_states_ref

__all__ = [
    "BACKENDS", "load_kernels", "resolve_backend",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref", "last_conv_inputs",
    "rmsnorm_gated", "rmsnorm_gated_ref", "ssd_chunk_scan", "ssd_chunk_scan_ref", "ssd_step", "ssd_step_ref", "ssd_varlen_states_ref",
]
