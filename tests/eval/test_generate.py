"""HFGenerator: left-padded batches give the one-prompt-at-a-time tokens; seeds reproduce; EOS trimming."""

import torch

from m1_plugins import M1Config, M1ForCausalLM
from m1_plugins.eval.generate import HFGenerator


def tiny_model(eos=None):
    torch.manual_seed(0)
    config = M1Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_layers=[1], mamba_d_state=16, mamba_head_dim=16, mamba_chunk_size=8,
                      mamba_kernels="reference", initializer_range=0.1, pad_token_id=0, bos_token_id=None, eos_token_id=eos)
    return M1ForCausalLM(config).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]


def test_greedy_batched_equals_one_prompt_at_a_time():
    model = tiny_model()
    batched = HFGenerator(model, pad_token_id=0, eos_token_ids=[95], batch_size=8)
    out = batched.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    assert [len(o) for o in out] == [2, 2, 2]
    for prompt, samples in zip(PROMPTS, out):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=[95])
        expected = single[0, len(prompt):].tolist()
        expected = expected[:expected.index(95) + 1] if 95 in expected else expected
        assert samples == [expected, expected]
    assert batched.tokens_generated == sum(len(s) for o in out for s in o)
    assert batched.seconds > 0


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    gen = HFGenerator(model, pad_token_id=0, eos_token_ids=[95], batch_size=4)
    a = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7)
    b = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=7)
    c = gen.generate(PROMPTS, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=8)
    assert a == b and a != c
    assert all(len(s) == 5 for o in a for s in o)  # no EOS in reach of a random model over 5 tokens


def test_rows_are_trimmed_after_the_first_eos():
    gen = HFGenerator(tiny_model(), pad_token_id=0, eos_token_ids=[3, 4])
    assert gen._trim([7, 8, 4, 0, 0]) == [7, 8, 4]
    assert gen._trim([3, 9]) == [3]
    assert gen._trim([7, 8]) == [7, 8]


def test_engine_generator_is_the_hf_generator_for_greedy_and_stops_at_eos():
    from m1_plugins.eval.generate import EngineGenerator
    from m1_plugins.rollout import M1Engine

    model = tiny_model()
    hf = HFGenerator(tiny_model(), pad_token_id=0, eos_token_ids=[95], batch_size=8)
    expected = hf.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    engine = EngineGenerator(M1Engine(model, max_num_seqs=8, max_model_len=64, block_size=16, kv_cache_tokens=512), [95])
    assert engine.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0) == expected
    stop = expected[1][0][2]  # a token the greedy continuation of prompt 1 produces: as EOS it ends that sample
    stopped = EngineGenerator(engine.engine, [stop]).generate(PROMPTS[1:2], n=1, temperature=0.0, top_p=1.0,
                                                               max_new_tokens=6, seed=0)
    assert stopped == [[expected[1][0][:expected[1][0].index(stop) + 1]]]
    sampled = [engine.generate(PROMPTS, n=3, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=s) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert engine.tokens_generated == sum(len(s) for call in [expected, *sampled] for o in call for s in o)


def test_a_transformer_runs_on_the_engine_as_its_all_attention_conversion(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from m1_plugins.eval.generate import EngineGenerator, engine_for

    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = [1, 4093, 2683, 314, 216, 34, 1232, 216, 35, 47]
    expected = teacher.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    generator = EngineGenerator(engine_for(teacher, batch_size=2, max_model_len=64), [2])
    out = generator.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    assert out == [[expected[:expected.index(2) + 1] if 2 in expected else expected]]
