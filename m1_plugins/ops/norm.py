"""Gated RMSNorm of the Mamba-2 mixer: norm(y * silu(z)), normalised per group of channels."""

import torch
import torch.nn.functional as F

from ._kernels import load_kernels


def rmsnorm_gated_ref(x, weight, z=None, eps=1e-6, group_size=None):
    """x, z: (..., dim); weight: (dim,); group_size divides dim (None = one group).

    The gate is applied before the norm (mamba_ssm's `norm_before_gate=False`), matching
    transformers' Mamba-2 hybrids so checkpoints export by renaming keys.
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    if z is not None:
        x = x * F.silu(z.to(x.dtype))
    group_size = group_size or x.shape[-1]
    grouped = x.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (grouped.flatten(-2) * weight.to(x.dtype)).to(dtype)


def rmsnorm_gated(x, weight, z=None, eps=1e-6, group_size=None, backend="reference"):
    if backend == "cuda" and not torch.is_grad_enabled():  # inference: our row-tiled kernel, a custom op
        from ._gated_norm_triton import rmsnorm_gated_rows

        return rmsnorm_gated_rows(x, weight, z, eps, group_size)
    if backend == "cuda":
        return load_kernels().rmsnorm_gated(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    return rmsnorm_gated_ref(x, weight, z=z, eps=eps, group_size=group_size)
