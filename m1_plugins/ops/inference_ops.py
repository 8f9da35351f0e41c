"""mamba-ssm's state-update kernel of a decode step as a torch custom op.

torch.compile cannot trace the kernel's Python launcher; as a custom op it is a single opaque node, so the engine's
compiled decode step is one graph (no graph break per layer, hence no recompilation per layer instance). Our own
inference kernels (`_conv_update_triton`, `_gated_norm_triton`, `_state_update_triton`) are custom ops for the same
reason.
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
