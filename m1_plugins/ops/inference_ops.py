"""The mamba-ssm kernels of a decode step as torch custom ops.

torch.compile cannot trace these kernels' Python launchers; as custom ops they are single opaque nodes, so the
engine's compiled decode step is one graph (no graph break per layer, hence no recompilation per layer instance).
Forward only: training keeps calling the kernels (and their autograd) directly.
"""

import torch

from ._kernels import load_kernels


@torch.library.custom_op("m1::selective_state_update", mutates_args=("state",))
def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None, dt_bias: torch.Tensor | None,
                           dt_softplus: bool) -> torch.Tensor:
    return load_kernels().state_update(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, dt_bias, dt_softplus):
    return torch.empty_like(x)


@torch.library.custom_op("m1::rmsnorm_gated", mutates_args=())
def rmsnorm_gated(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float,
                  group_size: int | None) -> torch.Tensor:
    return load_kernels().rmsnorm_gated(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


@rmsnorm_gated.register_fake
def _(x, weight, z, eps, group_size):
    return torch.empty_like(x)
