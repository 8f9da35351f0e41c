"""Triton kernel of one causal-conv1d decode step that shifts the conv state in place.

Each (sequence, channel block) program reads the state's width-1 columns and the new input once, writes the
output and the shifted state once: the minimum traffic. The PyTorch reference (`causal_conv1d_update_ref`), even
compiled, materialises the concatenated window and reads it twice. Used on CUDA when causal-conv1d is not
installed; widths 2 to 4 (Mamba's d_conv is 4).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_update_kernel(X, S, W, BIAS, OUT, dim, stride_xb, stride_sb, stride_sd, stride_wd, stride_ob,
                        WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < dim
    x = tl.load(X + b * stride_xb + d, mask=mask, other=0.0)
    state = S + b * stride_sb + d * stride_sd
    # the window, oldest first: s0 .. s_{WIDTH-2}, x (columns past the width read as zeros, without a load)
    s0 = tl.load(state, mask=mask, other=0.0)
    s1 = tl.load(state + 1, mask=mask & (WIDTH >= 3), other=0.0)
    s2 = tl.load(state + 2, mask=mask & (WIDTH >= 4), other=0.0)
    w = W + d * stride_wd
    acc = s0.to(tl.float32) * tl.load(w, mask=mask, other=0.0).to(tl.float32)
    acc += s1.to(tl.float32) * tl.load(w + 1, mask=mask & (WIDTH >= 3), other=0.0).to(tl.float32)
    acc += s2.to(tl.float32) * tl.load(w + 2, mask=mask & (WIDTH >= 4), other=0.0).to(tl.float32)
    acc += x.to(tl.float32) * tl.load(w + WIDTH - 1, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(OUT + b * stride_ob + d, acc, mask=mask)
    # the state drops its oldest column and takes x
    if WIDTH == 2:
        tl.store(state, x, mask=mask)
    if WIDTH == 3:
        tl.store(state, s1, mask=mask)
        tl.store(state + 1, x, mask=mask)
    if WIDTH == 4:
        tl.store(state, s1, mask=mask)
        tl.store(state + 1, s2, mask=mask)
        tl.store(state + 2, x, mask=mask)


@torch.library.custom_op("m1::conv_state_update", mutates_args=("conv_state",))  # one opaque node for torch.compile
def conv_state_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      silu: bool) -> torch.Tensor:
    """x: (batch, dim); conv_state: (batch, dim, width-1), its last dimension contiguous; weight: (dim, width)."""
    batch, dim = x.shape
    width = weight.shape[1]
    if not 2 <= width <= 4 or conv_state.stride(2) != 1:
        raise ValueError(f"conv_state_update takes widths 2..4 and a state with contiguous columns, got width {width} "
                         f"and state strides {conv_state.stride()}")
    x, weight = x if x.stride(1) == 1 else x.contiguous(), weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as the fake below says
    block_d = 256
    _conv_update_kernel[(batch, triton.cdiv(dim, block_d))](
        x, conv_state, weight, bias, out, dim, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        weight.stride(0), out.stride(0), WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@conv_state_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)
