"""The generation engine on the GPU: Triton paged attention and varlen states vs the reference, CUDA-graph decode
vs eager and vs the model's own step-by-step forward, bf16 log-probs vs the training forward, in-place weights."""

import os

import pytest
import torch

from m1_plugins import M1Config, M1ForCausalLM
from m1_plugins.rollout import M1Engine, SamplingParams
from m1_plugins.rollout.paged_attention import paged_decode_attention, paged_decode_attention_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    os.environ.get("M1_GPU_TESTS_ON_CPU") == "1", reason="CUDA graphs and GPU memory: no CPU dry run")]

VOCAB = 512
PROMPTS = [[5, 6, 7], list(range(10, 90)), [3] * 17, list(range(200, 333))]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
LAYOUTS = {
    "m1": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, mamba_d_state=16, mamba_head_dim=16),
    "head-aligned": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128, mamba_d_state=128,
                         mamba_head_dim=128, mamba_n_groups=2),
}


def make_model(layout, device, dtype=torch.float32, seed=0, backend="cuda", mamba_state_dtype="float32"):
    torch.manual_seed(seed)
    config = M1Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4, attn_layers=[1, 3],
                      max_position_embeddings=4096, initializer_range=0.05, pad_token_id=0, eos_token_id=None,
                      mamba_kernels=backend, mamba_state_dtype=mamba_state_dtype, **LAYOUTS[layout])
    return M1ForCausalLM(config).to(device=device, dtype=dtype).eval()


def make_engine(model, **kwargs):
    return M1Engine(model, **{"max_num_seqs": 8, "max_model_len": 512, "kv_cache_tokens": 8192, **kwargs})


def stepwise_greedy(model, prompt, n_tokens):
    out = model(torch.tensor([prompt], device=model.device), use_cache=True)
    cache, tokens = out.past_key_values, []
    for _ in range(n_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]], device=model.device), past_key_values=cache, use_cache=True)
    return tokens


def tokens_of(outputs):
    return [[s.token_ids for s in o.samples] for o in outputs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, head_dim, batch", [(24, 8, 128, 3), (9, 3, 64, 1), (24, 8, 128, 64)])
def test_paged_decode_attention_kernel(dtype, heads, kv_heads, head_dim, batch, device, record):
    block_size, max_blocks = 64, 20
    num_blocks = batch * max_blocks + 1
    k_pool = torch.randn(num_blocks, kv_heads, block_size, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    tables = (torch.randperm(num_blocks - 1, device=device)[:batch * max_blocks] + 1).view(batch, max_blocks)
    lengths = torch.randint(1, max_blocks * block_size, (batch,), device=device)
    lengths[0] = 1
    query = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    out = paged_decode_attention(query, k_pool, v_pool, tables, lengths, head_dim ** -0.5)
    ref = paged_decode_attention_ref(query.float(), k_pool.float(), v_pool.float(), tables, lengths, head_dim ** -0.5)
    err = (out.float() - ref).abs().max().item()
    bound = 2e-2 if dtype == torch.bfloat16 else 5e-3  # bf16 output rounding; fp32 tl.dot runs in TF32
    record("paged_attention.out", err=err, err_pt=0.0, bound=bound, ok=err <= bound)
    assert err <= bound


def test_varlen_states_kernel(device, record):
    from m1_plugins.ops import ssd_chunk_scan, ssd_varlen_states_ref

    lengths = [1, 70, 256, 300, 3]
    total, heads, headdim, groups, dstate = sum(lengths), 8, 16, 8, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    seq_idx = torch.arange(len(lengths), device=device).repeat_interleave(torch.tensor(lengths, device=device))[None]
    x, dt = torch.randn(1, total, heads, headdim, device=device), torch.randn(1, total, heads, device=device)
    B, C = torch.randn(1, total, groups, dstate, device=device), torch.randn(1, total, groups, dstate, device=device)
    A, dt_bias = -torch.rand(heads, device=device) * 4, torch.rand(heads, device=device)
    _, states = ssd_chunk_scan(x, dt, A, B, C, 256, dt_bias=dt_bias, seq_idx=seq_idx, cu_seqlens=cu, backend="cuda")
    ref = ssd_varlen_states_ref(x, dt, A, B, cu, dt_bias=dt_bias)
    err = ((states - ref).abs().max() / ref.abs().max()).item()
    record("varlen_states", err=err, err_pt=0.0, bound=5e-3, ok=err <= 5e-3)
    assert err <= 5e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_graphs_equal_eager_and_the_models_own_decoding(layout, device, record):
    graphs = make_engine(make_model(layout, device))
    assert graphs.stats.graph_captures == len(graphs._buckets)
    sampling = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=2)
    out = tokens_of(graphs.generate(PROMPTS, sampling))
    eager = make_engine(make_model(layout, device), cuda_graphs=False)
    assert tokens_of(eager.generate(PROMPTS, sampling)) == out
    reference = make_model(layout, device)
    expected = [stepwise_greedy(reference, p, 40) for p in PROMPTS]
    mismatches = sum(a != b for o, e in zip(out, expected) for s in o for a, b in zip(s, e))
    record("greedy_vs_stepwise.mismatched_tokens", err=mismatches, err_pt=0, bound=0, ok=mismatches == 0)
    assert out == [[e, e] for e in expected]


@pytest.mark.parametrize("state_dtype", ["float32", "model"])
def test_bf16_logprobs_match_the_training_forward(state_dtype, device, record):
    """Sampled at temperature 1: the engine's log-probs vs a packed training-path forward of the same tokens, with the
    engine's SSM state slots in fp32 (the default) or in bf16 (`mamba_state_dtype="model"`: half the state traffic)."""
    model = make_model("m1", device, dtype=torch.bfloat16, mamba_state_dtype=state_dtype)
    engine = make_engine(model)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=200, ignore_eos=True, seed=0))
    trainer = make_model("m1", device, dtype=torch.bfloat16)
    diffs = []
    for prompt, output in zip(PROMPTS, outputs):
        sample = output.samples[0]
        ids = torch.tensor([prompt + sample.token_ids], device=device)
        logits = trainer(ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(sample.token_ids, device=device)[:, None])[:, 0]
        diffs.append(torch.tensor(sample.logprobs, device=device) - expected)
    diff = torch.cat(diffs)
    kl = (torch.exp(-diff) - 1 + diff).mean().item()  # k3 estimate of KL(rollout || trainer) on the rollout's tokens
    record("bf16_logprobs.max_abs", err=diff.abs().max().item(), err_pt=0.0, bound=0.25, ok=diff.abs().max().item() <= 0.25)
    record("bf16_logprobs.mean_abs", err=diff.abs().mean().item(), err_pt=0.0, bound=0.02, ok=diff.abs().mean().item() <= 0.02)
    record("bf16_logprobs.mismatch_kl", err=kl, err_pt=0.0, bound=1e-3, ok=kl <= 1e-3)
    assert diff.abs().max() <= 0.25 and diff.abs().mean() <= 0.02 and kl <= 1e-3


def test_decode_steps_never_wait_for_the_gpu(device):
    """The host queues a decode step, then reads the previous step's tokens through an event: nothing else in a step
    may synchronise with the GPU (a `.tolist()` of a device tensor, a copy from pageable memory, torch.multinomial's
    input check), or the host's work stops overlapping the GPU's. Greedy, seeded and unseeded sampling, new KV
    blocks and finishing sequences included."""
    engine = make_engine(make_model("m1", device))
    samplings = [SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                 SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=70, ignore_eos=True, seed=1),
                 SamplingParams(temperature=1.0, max_tokens=90, ignore_eos=True, logprobs=True)]
    ids = [engine.add_request(p, s) for p, s in zip(PROMPTS, samplings * 2)]
    while engine.waiting:
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [len(engine._finished.pop(i).samples[0].token_ids) for i in ids] == [100, 70, 90, 100]


def test_load_weights_keeps_the_graphs_and_sleep_frees_the_cache(device):
    engine = make_engine(make_model("m1", device))
    captures = engine.stats.graph_captures
    before = tokens_of(engine.generate(PROMPTS, GREEDY))
    new = make_model("m1", device, seed=1)
    engine.load_weights(new.state_dict().items())
    after = tokens_of(engine.generate(PROMPTS, GREEDY))
    assert engine.stats.graph_captures == captures  # replayed, not re-captured
    assert after != before
    assert after == tokens_of(make_engine(make_model("m1", device, seed=1)).generate(PROMPTS, GREEDY))
    # decoding allocates nothing that outlives a step
    allocated = torch.cuda.memory_allocated()
    engine.generate(PROMPTS, GREEDY)
    assert torch.cuda.memory_allocated() == allocated
    pool_bytes = sum(t.numel() * t.element_size() for t in engine.state.k_pools.values()) * 2
    engine.sleep()
    assert allocated - torch.cuda.memory_allocated() >= pool_bytes
    engine.wake_up()
    assert tokens_of(engine.generate(PROMPTS, GREEDY)) == after
