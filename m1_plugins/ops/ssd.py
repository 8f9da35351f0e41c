"""Mamba-2 SSD scan: a chunked pure-PyTorch reference and its single-step twin.

The recurrence, per head h (Dao & Gu, 2024, "Transformers are SSMs", Listing 1):
    dt_t  = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T          h_t: (headdim, dstate)
    y_t   = h_t C_t + D * x_t

Shapes follow mamba_ssm so the Triton kernels are drop-in twins (`ops/_kernels.py`):
    x:       (batch, seqlen, nheads, headdim)
    dt:      (batch, seqlen, nheads)            raw, before dt_bias / softplus
    A:       (nheads,)                           negative
    B, C:    (batch, seqlen, ngroups, dstate)    nheads % ngroups == 0
    D:       (nheads,)
    seq_idx: (batch, seqlen) int, non-decreasing document index; the state resets where it changes
    state:   (batch, nheads, headdim, dstate)
"""

import math

import torch
import torch.nn.functional as F

from . import inference_ops
from ._kernels import load_kernels


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = sum_{k=j+1..i} x_k, and -inf above the diagonal.

    Built from a masked cumsum rather than cumsum differences, so a -inf entry (a document
    start) never meets +inf and no NaN appears.
    """
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # x[..., k, j] = x_k
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0).cumsum(dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return x.masked_fill(~causal, -math.inf)


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_chunk_scan_ref(
    x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
):
    """Chunked SSD scan over a whole sequence. Returns (y like x, final_states fp32).

    Documents in a packed row are separated by `seq_idx`: at each document start the decay is set
    to exp(-inf) = 0, so nothing of the previous document survives; `initial_states` feed the
    first document only. Computes in fp32 (fp64 if given fp64, for gradcheck).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, seqlen, nheads, headdim = x.shape
    rep = nheads // B.shape[2]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    dA = dt * A.to(dtype)  # (b, l, h)
    if seq_idx is not None:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)
        dA = dA.masked_fill(starts[..., None], -math.inf)
    B = B.to(dtype).repeat_interleave(rep, dim=2)  # (b, l, h, n)
    C = C.to(dtype).repeat_interleave(rep, dim=2)
    xdt = x.to(dtype) * dt[..., None]

    pad = -seqlen % chunk_size  # padded steps have dt = 0: no decay, no input
    chunks = (seqlen + pad) // chunk_size

    def to_chunks(t):  # (b, l, h, ...) -> (b, c, L, h, ...)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.view(batch, chunks, chunk_size, *t.shape[2:])

    xdt, B, C = to_chunks(xdt), to_chunks(B), to_chunks(C)
    dA = to_chunks(dA).permute(0, 3, 1, 2)  # (b, h, c, L)
    dA_cumsum = dA.cumsum(dim=-1)

    # 1. within each chunk: attention-like quadratic form
    L = torch.exp(_segsum(dA))  # (b, h, c, L, L)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, xdt)
    # 2. each chunk's final state, from its own inputs
    decay_to_end = L[..., -1, :]  # (b, h, c, L): exp(sum_{k=s+1..end} dA_k)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)
    # 3. pass states across chunks
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_states.to(dtype)[:, None], states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_states = states[:, :-1], states[:, -1]
    # 4. the carried-in state's contribution to each position
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(dA_cumsum))

    y = y.reshape(batch, chunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    return y.to(x.dtype), final_states


def ssd_varlen_states_ref(x, dt, A, B, cu_seqlens, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    """Final state of every document of a packed row (batch 1), (n_docs, nheads, headdim, dstate) fp32:
    h_end = sum_t exp(sum_{s=t+1..end} dt_s A) dt_t x_t B_t^T over the document's tokens (zero initial state).
    The decays come from an fp64 cumsum, so long rows lose nothing to cancellation."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    rep = x.shape[2] // B.shape[2]
    dt = _discretize_dt(dt[0], dt_bias, dt_softplus, dt_limit, dtype)  # (l, h)
    cum = (dt.double() * A.double()).cumsum(0)  # (l, h)
    doc = torch.arange(len(cu_seqlens) - 1, device=x.device).repeat_interleave((cu_seqlens[1:] - cu_seqlens[:-1]).long())
    decay = torch.exp(cum[cu_seqlens[1:].long() - 1][doc] - cum).to(dtype)  # (l, h): decay from t to its document's end
    B = B[0].to(dtype).repeat_interleave(rep, dim=1)  # (l, h, n)
    contributions = ((decay * dt)[..., None] * x[0].to(dtype))[..., None] * B[:, :, None, :]  # (l, h, p, n)
    states = contributions.new_zeros(len(cu_seqlens) - 1, *contributions.shape[1:])
    return states.index_add_(0, doc, contributions)  # a sum per document


def ssd_step_ref(
    state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
):
    """One recurrent step; updates `state` in place and returns y.

    state: (batch, nheads, headdim, dstate); x: (batch, nheads, headdim); dt: (batch, nheads);
    B, C: (batch, ngroups, dstate).
    """
    dtype = torch.promote_types(state.dtype, torch.float32)
    rep = x.shape[1] // B.shape[1]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (b, h)
    B = B.to(dtype).repeat_interleave(rep, dim=1)  # (b, h, n)
    C = C.to(dtype).repeat_interleave(rep, dim=1)
    decay = torch.exp(dt * A.to(dtype))[..., None, None]
    new_state = state.to(dtype) * decay + (dt[..., None] * x.to(dtype))[..., None] * B[:, :, None, :]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    return y.to(x.dtype)


def ssd_chunk_scan(
    x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_limit=(0.0, math.inf),
    initial_states=None, seq_idx=None, cu_seqlens=None, backend="reference",
):
    """`ssd_chunk_scan_ref` (softplus on) or mamba-ssm's `mamba_chunk_scan_combined`. Returns (y, final_states);
    given `cu_seqlens` (a packed row of batch 1), final_states holds one state per document (n_docs, ...)."""
    if backend == "cuda":
        return load_kernels().chunk_scan(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
            dt_softplus=True, dt_limit=dt_limit, return_final_states=cu_seqlens is None,
            cu_seqlens=cu_seqlens, return_varlen_states=cu_seqlens is not None,
        )
    y, final_states = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_limit=dt_limit,
                                         initial_states=initial_states, seq_idx=seq_idx)
    if cu_seqlens is not None:
        final_states = ssd_varlen_states_ref(x, dt, A, B, cu_seqlens, dt_bias=dt_bias, dt_limit=dt_limit)
    return y, final_states


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_limit=(0.0, math.inf), backend="reference"):
    """`ssd_step_ref` (softplus on) or, on CUDA, a state-update kernel (same shapes as the ref): ours for small
    heads (`_state_update_triton`, M1's 16 x 16), mamba-ssm's `selective_state_update` otherwise."""
    if backend != "cuda":
        return ssd_step_ref(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit)
    batch, nheads, headdim = x.shape
    softplus = True
    if dt_limit != (0.0, math.inf):  # the kernels have no dt_limit: discretise here
        dt = _discretize_dt(dt, dt_bias, True, dt_limit, torch.float32)
        dt_bias, softplus = None, False
    from . import _state_update_triton

    if _state_update_triton.takes(state):
        return _state_update_triton.state_update(state, x, dt, A, B, C, D, dt_bias, softplus)
    if dt_bias is None:  # mamba-ssm's kernel reads dt_bias's strides unconditionally
        dt_bias = torch.zeros(nheads, device=x.device, dtype=torch.float32)
    dstate = state.shape[-1]
    # stride-0 views over headdim / dstate: the kernel's "tied" fast path
    return inference_ops.selective_state_update(
        state, x, dt[..., None].expand(batch, nheads, headdim),
        A[:, None, None].expand(nheads, headdim, dstate), B, C,
        None if D is None else D[:, None].expand(nheads, headdim),
        None if dt_bias is None else dt_bias[:, None].expand(nheads, headdim), softplus,
    )
