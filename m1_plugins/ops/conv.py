"""Causal depthwise conv1d that honours document boundaries, and its single-step twin.

Shapes follow causal-conv1d:
    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen)
    conv_state: (batch, dim, width - 1), the last width-1 inputs, oldest first.
"""

import torch
import torch.nn.functional as F

from ._kernels import load_kernels


def _is_silu(activation) -> bool:
    if activation in (None, "identity"):
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _activate(x, activation):
    return F.silu(x) if _is_silu(activation) else x


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None, activation="silu"):
    """y_t = act(bias + sum_j weight[:, -1-j] * x_{t-j}), where x_{t-j} counts only if it lies in the
    same document as x_t (else it is a zero, exactly as at the start of a sequence).

    `initial_states` (batch, dim, width-1) stand in front of x (continuing a cached sequence).
    Runs on any device: this is also the CUDA path when causal-conv1d is not installed.
    """
    width, seqlen = weight.shape[1], x.shape[-1]
    if initial_states is not None:
        x = torch.cat([initial_states.to(x.dtype), x], dim=-1)
        if seq_idx is not None:
            seq_idx = F.pad(seq_idx, (width - 1, 0), value=0)
            seq_idx[:, : width - 1] = seq_idx[:, width - 1 : width]
    out = x * weight[:, -1:]
    for j in range(1, width):
        shifted = F.pad(x, (j, 0))[..., : x.shape[-1]]
        if seq_idx is not None:
            same_doc = F.pad(seq_idx, (j, 0), value=-1)[..., : x.shape[-1]] == seq_idx
            shifted = shifted * same_doc[:, None, :].to(x.dtype)
        out = out + shifted * weight[:, -1 - j : weight.shape[1] - j]
    if bias is not None:
        out = out + bias[:, None]
    return _activate(out[..., -seqlen:], activation)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation="silu"):
    """One step. x: (batch, dim); conv_state (batch, dim, width-1) is shifted in place."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # (b, d, width)
    conv_state.copy_(window[..., 1:])
    out = (window.to(weight.dtype) * weight).sum(dim=-1)
    if bias is not None:
        out = out + bias
    return _activate(out, activation).to(x.dtype)


def causal_conv1d_by_documents(x, weight, bias=None, seq_idx=None, activation="silu"):
    """`causal_conv1d_ref` (without initial states) as one depthwise F.conv1d: every document is copied behind
    width-1 zeros of its own, convolved, and read back. Two copies of x instead of the reference's
    per-tap shifted and masked tensors; used on CUDA when causal-conv1d is not installed."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if seq_idx is None:
        out = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=dim)[..., :seqlen]
        return _activate(out, activation)
    starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True).reshape(-1)  # rows start documents too
    dest = torch.arange(batch * seqlen, device=x.device) + starts.cumsum(0) * (width - 1)  # position behind the zeros
    padded = x.new_zeros(dim, batch * seqlen + int(starts.sum()) * (width - 1))
    padded = padded.index_copy(1, dest, x.permute(1, 0, 2).reshape(dim, batch * seqlen))
    out = F.conv1d(padded[None], weight[:, None], bias, groups=dim)[0]  # out[:, j] ends its window at input j+width-1
    out = out.index_select(1, dest - (width - 1)).reshape(dim, batch, seqlen).permute(1, 0, 2)
    return _activate(out, activation)


def last_conv_inputs(x, width: int, cu_seqlens=None):
    """The conv state after `x` (batch, dim, seqlen): its last `width - 1` inputs, zeros in front of a short
    sequence. With `cu_seqlens` (a packed row, batch 1): one state per document, (n_docs, dim, width - 1)."""
    if cu_seqlens is None:
        return F.pad(x, (width - 1, 0))[..., x.shape[-1]:]
    starts, ends = cu_seqlens[:-1, None], cu_seqlens[1:, None]
    idx = ends - (width - 1) + torch.arange(width - 1, device=x.device)  # (n_docs, width-1) positions in the row
    window = x[0][:, idx.clamp(min=0)].permute(1, 0, 2)  # (n_docs, dim, width-1)
    return window * (idx >= starts)[:, None, :].to(x.dtype)  # inputs before a document's start are zeros


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, activation="silu", backend="reference"):
    """On CUDA: causal-conv1d's kernel when installed, else `causal_conv1d_by_documents`; the reference
    elsewhere and whenever a cached `initial_states` is continued."""
    if backend != "cuda" or initial_states is not None:
        return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states, activation=activation)
    kernels = load_kernels()
    if kernels.conv1d is None:
        return causal_conv1d_by_documents(x, weight, bias, seq_idx=seq_idx, activation=activation)
    # the kernel wants channel-last memory when given seq_idx: (b, l, d) viewed as (b, d, l)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    seq_idx = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    return kernels.conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu", backend="reference"):
    """On CUDA: causal-conv1d's kernel when installed, else ours (`_conv_update_triton`, widths 2..4); the
    reference elsewhere."""
    kernels = load_kernels() if backend == "cuda" else None
    if kernels is not None and kernels.conv1d_update is not None:
        return kernels.conv1d_update(x, conv_state, weight, bias, activation)
    if backend == "cuda" and 2 <= weight.shape[1] <= 4:
        from ._conv_update_triton import conv_state_update

        return conv_state_update(x, conv_state, weight, bias, _is_silu(activation))
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
