"""Causal depthwise conv1d that honours document boundaries, and its single-step twin.

Shapes follow causal-conv1d:
    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen)
    conv_state: (batch, dim, width - 1), the last width-1 inputs, oldest first.
"""

import torch
import torch.nn.functional as F

from ._kernels import load_kernels


def _activate(x, activation):
    if activation in (None, "identity"):
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation must be None or 'silu', got {activation!r}")


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
    """`causal_conv1d_ref` (without initial states) as one depthwise F.conv1d over the whole row, after which the
    few outputs within width-1 of a document start lose the taps that reach into earlier documents. Used on CUDA
    when causal-conv1d is not installed: no per-tap full-size tensors and no copies of x."""
    seqlen, width = x.shape[-1], weight.shape[1]
    out = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=x.shape[1])[..., :seqlen]
    if seq_idx is None:
        return _activate(out, activation)
    rows, start = (seq_idx[:, 1:] != seq_idx[:, :-1]).nonzero().unbind(1)
    start = start + 1
    # one small gather of the width-1 inputs before every document start
    cols = start[:, None] + torch.arange(1 - width, 0, device=x.device)
    window = x[rows[:, None], :, cols.clamp(min=0)] * (cols >= 0)[..., None].to(x.dtype)  # (n, width-1, dim)
    # the output at start+o (o < width-1) wrongly includes taps j > o, which read window column o - j + width - 1
    leak = torch.stack([sum(window[:, o - j + width - 1] * weight[:, -1 - j] for j in range(o + 1, width))
                        for o in range(width - 1)], dim=1)  # (n, width-1, dim)
    pos = start[:, None] + torch.arange(width - 1, device=x.device)
    owned = (pos < seqlen) & (seq_idx[rows[:, None], pos.clamp(max=seqlen - 1)] == seq_idx[rows, start][:, None])
    r, p = rows[:, None].expand_as(pos)[owned], pos[owned]  # positions not owned belong to a later, closer start
    out[r, :, p] = out[r, :, p] - leak[owned]
    return _activate(out, activation)


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
    kernels = load_kernels() if backend == "cuda" else None
    if kernels is not None and kernels.conv1d_update is not None:
        return kernels.conv1d_update(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
