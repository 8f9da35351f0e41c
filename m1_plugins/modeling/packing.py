"""Document boundaries of packed rows, derived once per forward and shared by all layers.

A packed row holds several documents back to back; `position_ids` restart at 0 at each one
(Axolotl's multipack) or `cu_seqlens` lists their offsets (VeRL's remove-padding path).
"""

import torch


def seq_idx_from_position_ids(position_ids: torch.LongTensor) -> torch.Tensor | None:
    """(batch, seqlen) document index per token, or None when no row holds more than one document.

    A document starts wherever the position does not continue the previous one.
    """
    if position_ids.shape[-1] < 2:
        return None
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not starts.any():
        return None
    return torch.nn.functional.pad(starts, (1, 0)).cumsum(-1).to(torch.int32)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, total) document index from cumulative lengths [0, l0, l0+l1, ..., total]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed row has {total} tokens.")
    doc = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return doc.repeat_interleave(lengths)[None]


def position_ids_from_seq_idx(seq_idx: torch.Tensor) -> torch.LongTensor:
    """Positions restarting at 0 at each document of each row."""
    idx = torch.arange(seq_idx.shape[-1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.nn.functional.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


def attention_bias(
    q_len: int, past_len: int, seq_idx=None, key_mask=None, dtype=torch.float32, device=None,
) -> torch.Tensor | None:
    """Additive mask (batch|1, 1, q_len, past_len + q_len): causal, within one document, valid keys only.

    Returns None when plain causal attention is exact (one document, no padding, no past): the
    attention backend then takes its fast `is_causal` path. Every query may see itself, so rows of
    padding never become all -inf (their outputs are masked out downstream).
    """
    if seq_idx is None and key_mask is None and past_len == 0:
        return None
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # (1, q, k)
    if seq_idx is not None:
        if past_len:
            raise NotImplementedError("packed documents (seq_idx) cannot continue from a cache")
        allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].bool()
    allowed = allowed | (k_pos == q_pos)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
