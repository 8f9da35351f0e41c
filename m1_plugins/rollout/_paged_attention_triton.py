"""Triton kernel of `paged_decode_attention`: one program per (sequence, KV head, context split).

The query heads that share a KV head are one tile (padded to 16 rows for `tl.dot`), so every K/V block is read
from HBM once per step — decode attention is bandwidth-bound and this is its minimum traffic. Long contexts at
small batch are split over several programs (flash-decoding) and merged by a second, tiny kernel.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(Q, K, V, BT, CL, O, M, L, scale_log2,
                   stride_qb, stride_qh, stride_kn, stride_kh, stride_ks, stride_bt,
                   stride_ob, stride_os, stride_oh, stride_mb, stride_ms,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCKS_PER_SPLIT: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(CL + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, BLOCK_SIZE)
    heads = kvh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(ctx, BLOCK_SIZE))
    for i in range(first, last):
        block = tl.load(BT + b * stride_bt + i)
        offsets = block * stride_kn + kvh * stride_kh + s[:, None] * stride_ks + d[None, :]
        k = tl.load(K + offsets)
        qk = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_G, BLOCK_SIZE), log2 units
        qk = tl.where((i * BLOCK_SIZE + s)[None, :] < ctx, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(V + offsets)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out_mask = g[:, None] < GROUP
    tl.store(O + b * stride_ob + split * stride_os + heads[:, None] * stride_oh + d[None, :], acc, mask=out_mask)
    tl.store(M + b * stride_mb + split * stride_ms + heads, m_i, mask=g < GROUP)
    tl.store(L + b * stride_mb + split * stride_ms + heads, l_i, mask=g < GROUP)


@torch.library.custom_op("m1::paged_decode_attention", mutates_args=())  # one opaque node for torch.compile
def paged_decode_attention_triton(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = query.shape
    _, kv_heads, block_size, _ = k_pool.shape
    group = num_heads // kv_heads
    # enough programs to fill the GPU: split the context when batch x kv_heads is small
    splits = max(1, min(block_tables.shape[1], 256 // max(1, batch * kv_heads)))
    blocks_per_split = triton.cdiv(block_tables.shape[1], splits)
    splits = triton.cdiv(block_tables.shape[1], blocks_per_split)
    out = torch.empty(batch, splits, num_heads, head_dim, device=query.device, dtype=torch.float32)
    m = torch.empty(batch, splits, num_heads, device=query.device, dtype=torch.float32)
    l = torch.empty_like(m)
    query = query.contiguous()
    _decode_kernel[(batch, kv_heads, splits)](
        query, k_pool, v_pool, block_tables, context_lens, out, m, l, scale * LOG2E,
        query.stride(0), query.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2), m.stride(0), m.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCKS_PER_SPLIT=blocks_per_split, num_warps=4, num_stages=2,
    )
    # merge the splits (empty splits have m = -inf, l = 0 and contribute nothing)
    m_max = m.max(dim=1, keepdim=True).values
    weight = torch.exp2(m - m_max)  # (batch, splits, heads)
    total = (l * weight).sum(dim=1)
    return ((out * weight[..., None]).sum(dim=1) / total[..., None]).to(query.dtype)


@paged_decode_attention_triton.register_fake
def _(query, k_pool, v_pool, block_tables, context_lens, scale):
    return torch.empty_like(query)
