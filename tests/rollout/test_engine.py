"""The generation engine's laws on CPU (fp32, eager path): its tokens and log-probs are the model's."""

import asyncio
import dataclasses

import pytest
import torch

from m1_plugins import M1ForCausalLM
from m1_plugins.rollout import AsyncM1Engine, M1Engine, SamplingParams

PROMPTS = [[5, 6, 7], list(range(10, 40)), [3] * 17, [50, 2, 9, 11]]  # lengths 3, 30, 17, 4 (blocks of 16)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def engine_for(model, **kwargs):
    kwargs = {"max_num_seqs": 8, "max_model_len": 128, "block_size": 16, "kv_cache_tokens": 2048, **kwargs}
    return M1Engine(model, **kwargs)


def twin(model):
    """A copy of the model with its own parameters (the engine switches its model's attention function)."""
    copy = M1ForCausalLM(model.config.__class__.from_dict(model.config.to_dict())).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def stepwise_greedy(model, prompt, n_tokens):
    """The plain recurrence: one forward of the prompt, then one forward per token with the model's own cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache, tokens = out.past_key_values, []
    for _ in range(n_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
    return tokens


def full_forward_logprobs(model, prompt, tokens, temperature=1.0):
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("layout", ["m1", "head-aligned", "m1-xb2"])
def test_greedy_is_the_stepwise_forward_and_generate(make_model, layout):
    model = make_model(layout, attn_layers=[1, 3])
    reference = twin(model)
    outputs = engine_for(model).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2))
    for prompt, output in zip(PROMPTS, outputs):
        expected = stepwise_greedy(reference, prompt, 20)
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert hf[0, len(prompt):].tolist() == expected
        assert [s.token_ids for s in output.samples] == [expected, expected]
        assert [s.finish_reason for s in output.samples] == ["length", "length"]


def test_all_attention_model_runs_on_the_same_engine(make_model):
    model = make_model(attn_layers=[0, 1, 2, 3])
    reference = twin(model)
    outputs = engine_for(model).generate(PROMPTS, GREEDY)
    assert [o.samples[0].token_ids for o in outputs] == [stepwise_greedy(reference, p, 20) for p in PROMPTS]


def test_logprobs_match_a_full_forward(make_model):
    model = make_model(attn_layers=[1, 3])
    reference = twin(model)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, max_tokens=24, ignore_eos=True, n=3, seed=1)
    for prompt, output in zip(PROMPTS, engine_for(model).generate(PROMPTS, sampling)):
        for s in output.samples:
            expected = full_forward_logprobs(reference, prompt, s.token_ids, temperature=0.7)
            assert (torch.tensor(s.logprobs) - expected).abs().max() < 1e-4


def test_logprobs_only_when_asked_and_the_tokens_do_not_depend_on_it(make_model):
    model = make_model(attn_layers=[1])
    reference = twin(model)
    sampled = SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, n=2, seed=3)
    for sampling in (GREEDY, sampled):
        quiet = dataclasses.replace(sampling, logprobs=False)
        with_lp, without = (engine_for(model).generate(PROMPTS, s) for s in (sampling, quiet))
        assert [s.token_ids for o in with_lp for s in o.samples] == [s.token_ids for o in without for s in o.samples]
        assert all(s.logprobs is None for o in without for s in o.samples)
    # a batch mixing both: the request that asked gets the model's log-probs
    mixed = engine_for(model).generate(PROMPTS[:2], [sampled, quiet])
    expected = full_forward_logprobs(reference, PROMPTS[0], mixed[0].samples[0].token_ids, temperature=0.7)
    assert (torch.tensor(mixed[0].samples[0].logprobs) - expected).abs().max() < 1e-4
    assert mixed[1].samples[0].logprobs is None


def test_continuous_batching_and_preemption_give_the_static_batch_tokens(make_model):
    model = make_model(attn_layers=[1, 3])
    prompts = [p + [i] for i, p in enumerate(PROMPTS * 3)]  # distinct: identical prompts would share a prefill
    static = engine_for(model, max_num_seqs=16).generate(prompts, GREEDY)
    few_slots = engine_for(model, max_num_seqs=3)
    continuous = few_slots.generate(prompts, GREEDY)
    assert few_slots.stats.max_running == 3 and few_slots.stats.prefill_forwards > 1
    # a pool of 8 blocks of 16 tokens cannot hold 8 sequences of up to 50 tokens: preemption and resumption
    tight = engine_for(model, kv_cache_tokens=128)
    preempted = tight.generate(prompts, GREEDY)
    assert tight.stats.preemptions > 0
    tokens = lambda outs: [o.samples[0].token_ids for o in outs]  # noqa: E731
    assert tokens(continuous) == tokens(static) == tokens(preempted)


def test_the_host_one_step_behind_drops_the_token_after_a_stop_and_frees_the_slot(make_model):
    """The host reads a step's tokens only after queuing the next step: a sequence that stops on a stop token has
    run one step more, whose token is never reported, and its slot goes to a waiting request; one that ends by
    length is known in advance and runs no extra step."""
    model = make_model(attn_layers=[1, 3])
    reference = twin(model)
    prompts = [p + [i] for i, p in enumerate(PROMPTS * 2)]
    expected = [stepwise_greedy(reference, p, 20) for p in prompts]
    stop = expected[0][4]
    sampling = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop])
    engine = engine_for(model, max_num_seqs=2)
    reported = [[] for _ in prompts]
    ids = [engine.add_request(p, sampling, on_token=lambda i, token, lp, reason, k=k: reported[k].append(token))
           for k, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    for k, (request_id, tokens) in enumerate(zip(ids, expected)):
        out = engine._finished.pop(request_id).samples[0]
        cut = tokens.index(stop) + 1 if stop in tokens else 20
        assert out.token_ids == tokens[:cut] == reported[k]
        assert out.finish_reason == ("stop" if stop in tokens else "length")
    assert len(engine.free_slots) == 2 and len(engine.free_blocks) == engine.stats.num_blocks - 1

    engine = engine_for(model)
    engine.generate(PROMPTS[:2], GREEDY)
    steps = GREEDY.max_tokens - 1  # the first token comes from the prefill
    assert (engine.stats.decode_steps, engine.stats.decode_rows) == (steps, 2 * steps)
    # what `m1 bench` charges each step for the KV read: every context token, the one being decoded included
    assert engine.stats.decode_kv_tokens == sum(len(p) + k + 1 for p in PROMPTS[:2] for k in range(steps))


def test_load_weights_changes_the_outputs_in_place(make_model):
    model, other = make_model(attn_layers=[1, 3], seed=0), make_model(attn_layers=[1, 3], seed=1)
    engine = engine_for(model)
    before = engine.generate(PROMPTS[:2], GREEDY)
    addresses = [p.data_ptr() for p in model.parameters()]
    engine.load_weights(twin(other).state_dict().items())  # every name, lm_head.weight (tied) included
    after = engine.generate(PROMPTS[:2], GREEDY)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    assert [o.samples[0].token_ids for o in after] != [o.samples[0].token_ids for o in before]
    assert [o.samples[0].token_ids for o in after] == [stepwise_greedy(twin(other), p, 20) for p in PROMPTS[:2]]
    with pytest.raises(KeyError, match="not a parameter"):
        engine.load_weights([("model.layers.0.nonexistent", torch.zeros(1))])
    with pytest.raises(ValueError, match="another configuration"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_stop_tokens_eos_and_seeds(make_model):
    model = make_model(attn_layers=[1, 3])
    greedy = engine_for(model).generate([PROMPTS[1]], GREEDY)[0].samples[0].token_ids
    stop = greedy[5]
    out = engine_for(model).generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]))
    first = greedy.index(stop)
    assert out[0].samples[0].token_ids == greedy[:first + 1] and out[0].samples[0].finish_reason == "stop"
    eos_engine = engine_for(model, eos_token_id=stop)
    assert eos_engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20))[0].samples[0].token_ids == greedy[:first + 1]
    assert eos_engine.generate([PROMPTS[1]], GREEDY)[0].samples[0].token_ids == greedy  # ignore_eos
    # a seeded request draws the same samples whatever else is in the batch
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=7, n=2)
    alone = engine_for(model).generate([PROMPTS[0]], seeded)[0]
    crowded = engine_for(model).generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]], [SamplingParams(temperature=1.0), seeded, GREEDY])[1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in crowded.samples]
    assert alone.samples[0].token_ids != alone.samples[1].token_ids


def test_bad_requests_fail_alone(make_model):
    model = make_model(attn_layers=[1, 3])
    engine = engine_for(model)
    outputs = engine.generate([PROMPTS[0], [7] * 120, [], [200], PROMPTS[1]], GREEDY)
    assert [o.error is None for o in outputs] == [True, False, False, False, True]
    assert "max_model_len" in outputs[1].error and "empty" in outputs[2].error and "[0, 96)" in outputs[3].error
    assert outputs[4].samples[0].token_ids == stepwise_greedy(twin(model), PROMPTS[1], 20)
    too_many = engine.generate([PROMPTS[0]], SamplingParams(n=9))[0]
    assert "max_num_seqs" in too_many.error


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n .* must be >= 1"), (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_engine_arguments(make_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="M1ForCausalLM, got LlamaForCausalLM"):
        M1Engine(llama)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        engine_for(make_model(), cuda_graphs=True)
    with pytest.raises(MemoryError, match="less than one sequence"):
        engine_for(make_model(), kv_cache_tokens=64)


def test_async_engine_batches_concurrent_requests(make_model):
    model = make_model(attn_layers=[1, 3])
    expected = [o.samples[0].token_ids for o in engine_for(twin(model)).generate(PROMPTS, GREEDY)]
    engine = AsyncM1Engine(engine_for(model))

    async def main():
        return await asyncio.gather(*(engine.generate(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)))

    outputs = asyncio.run(main())
    assert [o.request_id for o in outputs] == ["r0", "r1", "r2", "r3"]
    assert [o.samples[0].token_ids for o in outputs] == expected
    assert engine.engine.stats.max_running > 1  # they ran together


def test_real_hybrid_engine_is_generate(smollm2_dir, tmp_path):
    """The SmolLM2-135M hybrid: engine greedy == transformers' generate with the model's own cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from m1_plugins.convert import convert_to_hybrid

    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hybrid = convert_to_hybrid(teacher, attn_layers=[9, 19, 29]).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is 2 + 3?", "Name a prime number larger than 10.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    reference = twin(hybrid)
    engine = M1Engine(hybrid, max_num_seqs=4, max_model_len=256, kv_cache_tokens=1024)
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert output.samples[0].token_ids == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("layout", ["m1", "head-aligned"])
def test_decode_step_compiles_as_one_graph(make_model, layout):
    """The engine compiles its decode step on GPU; a graph break there costs a recompilation per layer instance, and
    so does a guard on the batch size (each compilation of the 3B model takes minutes). fullgraph=True fails on any
    break, and every batch bucket must reuse the one graph (CPU, eager backend: the model-level code is the GPU path's)."""
    from torch._dynamo.utils import counters

    model = make_model(layout, attn_layers=[1, 3])
    engine = engine_for(model)
    expected = engine.generate(PROMPTS, GREEDY)
    torch._dynamo.reset()
    counters.clear()
    engine._decode_model = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    compiled = engine.generate(PROMPTS, GREEDY)
    assert [o.samples[0].token_ids for o in compiled] == [o.samples[0].token_ids for o in expected]
    for batch in (engine.max_num_seqs, 1, 3):  # the largest bucket (== the input buffers' rows), one sequence, another
        engine.generate(PROMPTS[:1] * batch, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert counters["stats"]["unique_graphs"] == 1


def test_identical_prompts_share_one_prefill_and_abort_keeps_partial_samples(make_model):
    model = make_model(attn_layers=[1, 3])
    expected = stepwise_greedy(twin(model), PROMPTS[1], 20)
    engine = engine_for(model)
    ids = [engine.add_request(PROMPTS[1], GREEDY) for _ in range(4)]  # as VeRL sends the n samples of a prompt
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.prefill_forwards == 1
    assert [engine._finished.pop(i).samples[0].token_ids for i in ids] == [expected] * 4

    engine.add_request(PROMPTS[0], GREEDY, request_id="waiting")
    engine.step()  # prefill: one token sampled
    engine.add_request(PROMPTS[2], GREEDY, request_id="queued")
    engine.step()  # prefill of the second
    engine.step()  # one decode step for both
    assert engine.abort() == 2 and not engine.has_unfinished()
    aborted = [engine._finished.pop(i) for i in ("waiting", "queued")]
    assert [len(o.samples[0].token_ids) for o in aborted] == [2, 2]
    assert all(o.samples[0].finish_reason == "abort" for o in aborted)
    assert len(engine.free_slots) == engine.max_num_seqs  # everything released


def test_async_stream_yields_the_tokens_as_they_come(make_model):
    model = make_model(attn_layers=[1, 3])
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)
    expected = engine_for(twin(model)).generate([PROMPTS[1]], sampling)[0]
    engine = AsyncM1Engine(engine_for(model))

    async def main():
        events = [e async for e in engine.stream(PROMPTS[1], sampling, request_id="s")]
        with pytest.raises(ValueError, match="empty prompt"):
            async for _ in engine.stream([], sampling, request_id="bad"):
                pass
        return events

    events = asyncio.run(main())
    for sample in (0, 1):
        mine = [e for e in events if e.sample == sample]
        assert [e.token for e in mine] == expected.samples[sample].token_ids
        assert [e.logprob for e in mine] == expected.samples[sample].logprobs
        assert [e.finish_reason for e in mine] == [None] * 5 + ["length"]
