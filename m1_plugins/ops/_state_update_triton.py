"""Triton kernel of the Mamba-2 decode step's state update for small heads (M1's heads: 16 channels x 16 states).

mamba-ssm's `selective_state_update` runs one program per (sequence, head, block of 16-32 channel rows): for M1's
heads that is a 1 KB fp32 state tile per program with half of its rows masked, and it reached ~51% of the HBM
bandwidth on an H200 at batch 512 (docs/benchmarks.md). Here a program takes BLOCK_H whole heads of one sequence, a
contiguous 16 KB of state, and reads and writes it once. Larger heads keep mamba-ssm's kernel, whose tiling suits
them (`takes`).
"""

import torch
import triton
import triton.language as tl

TILE = 4096  # state elements per program: BLOCK_H heads of P x N


def takes(state: torch.Tensor) -> bool:
    """Whether this kernel updates `state` (batch, nheads, P, N): power-of-two heads (Triton's blocks) of at most
    512 elements (16 x 32), each sequence's heads contiguous (as the engine's slots)."""
    P, N = state.shape[-2:]
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (P, N))
    return pow2 and P * N <= 512 and state.stride()[1:] == (P * N, N, 1)


@triton.jit
def _state_update_kernel(S, X, DT, A, B, C, D, DT_BIAS, Y, nheads, heads_per_group, stride_sb, stride_xb,
                         stride_dtb, stride_bb, stride_cb, stride_yb, P: tl.constexpr, N: tl.constexpr,
                         BLOCK_H: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < nheads
    p = tl.arange(0, P)
    n = tl.arange(0, N)
    dt = tl.load(DT + b * stride_dtb + h, mask=hmask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(DT_BIAS + h, mask=hmask, other=0.0).to(tl.float32)
    if SOFTPLUS:  # torch's softplus, threshold 20
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    decay = tl.exp(dt * tl.load(A + h, mask=hmask, other=0.0).to(tl.float32))
    group = h // heads_per_group
    bc_offs = group[:, None] * N + n[None, :]
    Bv = tl.load(B + b * stride_bb + bc_offs, mask=hmask[:, None], other=0.0).to(tl.float32)  # (H, N)
    Cv = tl.load(C + b * stride_cb + bc_offs, mask=hmask[:, None], other=0.0).to(tl.float32)
    x_offs = h[:, None] * P + p[None, :]
    x = tl.load(X + b * stride_xb + x_offs, mask=hmask[:, None], other=0.0).to(tl.float32)  # (H, P)
    s_offs = b * stride_sb + h[:, None, None] * (P * N) + p[None, :, None] * N + n[None, None, :]
    s_mask = hmask[:, None, None]
    state = tl.load(S + s_offs, mask=s_mask, other=0.0).to(tl.float32)  # (H, P, N)
    state = state * decay[:, None, None] + (dt[:, None] * x)[:, :, None] * Bv[:, None, :]
    tl.store(S + s_offs, state.to(S.dtype.element_ty), mask=s_mask)
    y = tl.sum(state * Cv[:, None, :], axis=2)
    if HAS_D:
        y += x * tl.load(D + h, mask=hmask, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + b * stride_yb + x_offs, y, mask=hmask[:, None])


@torch.library.custom_op("m1::state_update_small_heads", mutates_args=("state",))  # one opaque node for torch.compile
def state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """`ssd_step_ref`'s shapes: state (batch, nheads, P, N), see `takes`; x (batch, nheads, P); dt (batch, nheads);
    A, D, dt_bias (nheads,); B, C (batch, ngroups, N)."""
    batch, nheads, P = x.shape
    N = state.shape[-1]
    if not takes(state):
        raise ValueError(f"state_update takes power-of-two heads of <= 512 elements and contiguous per-sequence states, "
                         f"got heads of {P} x {N} and state strides {state.stride()}")
    x = x if x.stride()[1:] == (P, 1) else x.contiguous()
    B, C = (t if t.stride()[1:] == (N, 1) else t.contiguous() for t in (B, C))
    dt = dt if dt.stride(1) == 1 else dt.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(nheads), TILE // (P * N))
    _state_update_kernel[(batch, triton.cdiv(nheads, block_h))](
        state, x, dt, A, B, C, D, dt_bias, y, nheads, nheads // B.shape[1], state.stride(0), x.stride(0), dt.stride(0),
        B.stride(0), C.stride(0), y.stride(0), P=P, N=N, BLOCK_H=block_h, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, num_warps=4,
    )
    return y


@state_update.register_fake
def _(state, x, dt, A, B, C, D, dt_bias, dt_softplus):
    return x.new_empty(x.shape)
