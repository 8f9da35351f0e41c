"""Decode attention over a paged KV cache, plugged into transformers' attention dispatch.

KV of attention layer l lives in two pools of shape (num_blocks, num_kv_heads, block_size, head_dim); sequence b
owns the blocks `block_tables[b, :ceil(context_lens[b] / block_size)]`, in order. A decode step appends one token
per sequence (`write_kv`) and attends its query over the sequence's blocks (`paged_decode_attention`): a Triton
kernel on CUDA, a gather + SDPA reference elsewhere. Block 0 is the engine's scratch block (empty slots point at it).

The engine selects this module's function with `attn_implementation="m1_paged"`; prefill forwards (no
`paged_decode` argument) go to transformers' SDPA with the model's own block-diagonal mask.
"""

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_IMPLEMENTATION = "m1_paged"


@dataclass
class PagedDecode:
    """The per-step inputs of a decode forward (static buffers when captured in a CUDA graph)."""

    block_tables: torch.Tensor  # (batch, max_blocks) int64
    context_lens: torch.Tensor  # (batch,) int64, including the token written this step


def write_kv(k_pool, v_pool, key, value, slot_mapping):
    """key/value: (tokens, num_kv_heads, head_dim) written at flat slots `block * block_size + offset`."""
    block_size = k_pool.shape[2]
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    k_pool[block, :, offset] = key.to(k_pool.dtype)
    v_pool[block, :, offset] = value.to(v_pool.dtype)


def paged_decode_attention_ref(query, k_pool, v_pool, block_tables, context_lens, scale):
    """query: (batch, num_heads, head_dim) -> (batch, num_heads, head_dim). Gathers every sequence's blocks."""
    batch, num_heads, head_dim = query.shape
    _, kv_heads, block_size, _ = k_pool.shape
    if not torch.compiler.is_compiling():  # eager: gather only the blocks in use (a data-dependent shape)
        block_tables = block_tables[:, :-(-int(context_lens.max()) // block_size)]
    keys = k_pool[block_tables].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
    values = v_pool[block_tables].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
    valid = torch.arange(keys.shape[2], device=query.device)[None] < context_lens[:, None]  # (batch, keys)
    out = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None].to(keys.dtype), keys, values, attn_mask=valid[:, None, None], scale=scale,
        enable_gqa=True,  # also for equal head counts: a plain bool under torch.compile's symbolic shapes
    )
    return out[:, :, 0].to(query.dtype)


def paged_decode_attention(query, k_pool, v_pool, block_tables, context_lens, scale):
    if query.device.type != "cuda":
        return paged_decode_attention_ref(query, k_pool, v_pool, block_tables, context_lens, scale)
    from ._paged_attention_triton import paged_decode_attention_triton

    return paged_decode_attention_triton(query, k_pool, v_pool, block_tables, context_lens, scale)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            paged_decode: PagedDecode | None = None, **kwargs):
    """transformers' attention-function signature. In a decode step `key`/`value` are the layer's pools (the
    engine's cache returns them from `update`); otherwise plain SDPA over the given keys and mask."""
    if paged_decode is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = paged_decode_attention(query[:, :, 0], key, value, paged_decode.block_tables, paged_decode.context_lens,
                                 scaling)
    return out[:, None], None  # (batch, q_len=1, heads, head_dim), no attention weights


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
