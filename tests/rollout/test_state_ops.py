"""The engine's building blocks: per-document final states of a packed prefill, and paged decode attention."""

import torch
import torch.nn.functional as F

from m1_plugins.ops import last_conv_inputs, ssd_chunk_scan, ssd_chunk_scan_ref
from m1_plugins.rollout.paged_attention import paged_decode_attention_ref, write_kv

LENGTHS = [1, 7, 24, 3, 40]  # shorter and longer than the conv window and the chunk


def test_varlen_final_states_are_each_documents_own():
    torch.manual_seed(0)
    total, heads, headdim, groups, dstate = sum(LENGTHS), 4, 8, 2, 16
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    x, dt = torch.randn(1, total, heads, headdim), torch.randn(1, total, heads)
    B, C = torch.randn(1, total, groups, dstate), torch.randn(1, total, groups, dstate)
    A, dt_bias = -torch.rand(heads) * 4, torch.rand(heads)
    seq_idx = torch.arange(len(LENGTHS)).repeat_interleave(torch.tensor(LENGTHS))[None]
    y, states = ssd_chunk_scan(x, dt, A, B, C, 8, dt_bias=dt_bias, seq_idx=seq_idx, cu_seqlens=cu)
    assert states.shape == (len(LENGTHS), heads, headdim, dstate)
    for d, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        part = lambda t: t[:, start:end]  # noqa: E731
        y_d, state_d = ssd_chunk_scan_ref(part(x), part(dt), A, part(B), part(C), 8, dt_bias=dt_bias)
        torch.testing.assert_close(states[d], state_d[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[:, start:end], y_d, rtol=1e-5, atol=1e-5)


def test_last_conv_inputs_per_document():
    x = torch.randn(1, 5, sum(LENGTHS))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    states = last_conv_inputs(x, 4, cu)
    for d, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        torch.testing.assert_close(states[d:d + 1], last_conv_inputs(x[..., start:end], 4))
        torch.testing.assert_close(last_conv_inputs(x[..., start:end], 4), F.pad(x[..., start:end], (3, 0))[..., -3:])


def test_paged_decode_attention_is_attention_over_the_sequence():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks = 6, 2, 16, 16, 20
    lengths = [1, 16, 17, 50]
    k_pool, v_pool = torch.zeros(num_blocks, kv_heads, block_size, head_dim), torch.zeros(num_blocks, kv_heads, block_size, head_dim)
    free = torch.randperm(num_blocks - 1) + 1  # blocks in scattered order
    tables, keys, values, used = torch.zeros(len(lengths), 4, dtype=torch.long), [], [], 0
    for b, n in enumerate(lengths):
        blocks = free[used:used + -(-n // block_size)]
        used += len(blocks)
        tables[b, :len(blocks)] = blocks
        k, v = torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
        pos = torch.arange(n)
        write_kv(k_pool, v_pool, k, v, blocks[pos // block_size] * block_size + pos % block_size)
        keys.append(k)
        values.append(v)
    query = torch.randn(len(lengths), heads, head_dim)
    out = paged_decode_attention_ref(query, k_pool, v_pool, tables, torch.tensor(lengths), head_dim ** -0.5)
    for b in range(len(lengths)):
        k = keys[b].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)  # (heads, n, head_dim)
        v = values[b].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        expected = F.scaled_dot_product_attention(query[b][:, None], k, v)[:, 0]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)
