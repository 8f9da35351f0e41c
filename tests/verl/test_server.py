"""The m1 rollout server in-process on CPU, with the real engine and a tiny M1 model: VeRL's sampling dict, concurrent
requests, log-probs against the model's forward, sleep / wake, bucketed weight sync, refusals."""

import asyncio

import pytest
import torch

pytest.importorskip("verl")

from verl.workers.config import HFModelConfig, RolloutConfig  # noqa: E402
from verl.workers.rollout.replica import RolloutMode  # noqa: E402

from m1_plugins.rollout import SamplingParams  # noqa: E402
from m1_plugins.verl.server import PROBE_PROMPT, M1Server, engine_sampling  # noqa: E402
from m1_plugins.verl.weights import send_weights  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(100, 130)), [42] * 17, [50, 2, 9, 11]]
# what VeRL's agent loop sends for training samples (rollout.temperature etc. and calculate_log_probs), + ignore_eos
# so that the random model's tokens run to the length limit
VERL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
GREEDY = {**VERL_SAMPLING, "temperature": 0, "ignore_eos": True}


def rollout_config(**overrides) -> RolloutConfig:
    kwargs = dict(name="m1", tensor_model_parallel_size=1, prompt_length=32, response_length=16, max_num_seqs=8,
                  load_format="auto", dtype="float32", engine_kwargs={"m1": {"kv_cache_tokens": 2048, "block_size": 16}})
    return RolloutConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def model_config(m1_dir):
    return HFModelConfig(path=str(m1_dir))


@pytest.fixture(scope="module")
def reference(m1_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(m1_dir, dtype=torch.float32).eval()


def server_for(model_config, **overrides) -> M1Server:
    return M1Server(rollout_config(**overrides), model_config, RolloutMode.HYBRID, replica_rank=0, cuda_visible_devices="")


@torch.no_grad()
def greedy_reference(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def forward_logprobs(model, prompt, tokens, temperature=1.0):
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_verl_sampling_dict_to_engine_params():
    config = rollout_config()  # prompt_length 32 + response_length 16
    assert engine_sampling(VERL_SAMPLING, config, prompt_len=10, max_len=48) == SamplingParams(
        temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, logprobs=True)
    # validation's greedy dict; a prompt longer than prompt_length gets only what is left of the total budget
    assert engine_sampling({"temperature": 0, "top_p": 1.0, "top_k": -1}, config, 40, 48) == SamplingParams(
        temperature=0.0, top_k=0, max_tokens=8, logprobs=False)
    # explicit limits are clamped to the room left in max_model_len; tool loops add stop tokens
    assert engine_sampling({"max_tokens": 100, "top_k": 20, "stop_token_ids": [7, 8], "seed": 3, "ignore_eos": True,
                            "logprobs": 0}, config, 10, 48) == SamplingParams(
        top_k=20, max_tokens=38, stop_token_ids=(7, 8), seed=3, ignore_eos=True, logprobs=True)
    assert engine_sampling({"max_new_tokens": 5}, config, 10, 48).max_tokens == 5

    with pytest.raises(ValueError, match=r"\['presence_penalty'\] are not supported.*supported: \['temperature'"):
        engine_sampling({"presence_penalty": 0.5}, config, 10, 48)
    with pytest.raises(NotImplementedError, match="rollout.repetition_penalty=1.0"):
        engine_sampling({"repetition_penalty": 1.1}, config, 10, 48)
    with pytest.raises(ValueError, match="sampled token's log-prob only"):
        engine_sampling({"logprobs": 5}, config, 10, 48)
    with pytest.raises(ValueError, match="48 tokens, leaving no room to generate within max_model_len 48"):
        engine_sampling({}, config, 48, 48)


def test_concurrent_requests_batch_and_match_the_model(model_config, reference):
    server = server_for(model_config)

    async def scenario():
        await server.launch_server()
        return await asyncio.gather(*[server.generate(p, dict(GREEDY), f"r{i}") for i, p in enumerate(PROMPTS)])

    outputs = asyncio.run(scenario())
    stats = server.engine.engine.stats
    assert (stats.prefill_forwards, stats.max_running) == (1, 4)  # one packed prefill, then one batch of 4
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == greedy_reference(reference, prompt, 16)  # response_length 16
        torch.testing.assert_close(torch.tensor(out.log_probs), forward_logprobs(reference, prompt, out.token_ids),
                                   atol=1e-4, rtol=0)
        assert (out.stop_reason, out.extra_fields) == ("completed", {"global_steps": None})


def test_seeded_sampling_is_reproducible_and_logprobs_are_temperature_scaled(model_config, reference):
    server = server_for(model_config)
    sampling = {**VERL_SAMPLING, "temperature": 0.7, "ignore_eos": True}

    async def scenario():
        await server.launch_server()
        return await asyncio.gather(*[server.generate(PROMPTS[0], {**sampling, "seed": seed}, f"s{i}")
                                      for i, seed in enumerate([7, 7, 8])])

    first, again, other = asyncio.run(scenario())
    assert first.token_ids == again.token_ids != other.token_ids
    torch.testing.assert_close(torch.tensor(first.log_probs), forward_logprobs(reference, PROMPTS[0], first.token_ids, 0.7),
                               atol=1e-4, rtol=0)


def test_sleep_waits_for_requests_then_wake_up_restores(model_config, reference):
    server = server_for(model_config)

    async def scenario():
        await server.launch_server()
        in_flight = asyncio.create_task(server.generate(PROMPTS[1], dict(GREEDY), "a"))
        await asyncio.sleep(0)  # the request is in the engine
        await server.sleep()  # returns once it has finished, then frees the cache
        asleep = server.engine.engine.state is None
        with pytest.raises(RuntimeError, match="asleep"):
            await server.generate(PROMPTS[0], dict(GREEDY), "b")
        await server.wake_up()
        return in_flight.result(), asleep, await server.generate(PROMPTS[1], dict(GREEDY), "c")

    before, asleep, after = asyncio.run(scenario())
    assert asleep and before.token_ids == after.token_ids == greedy_reference(reference, PROMPTS[1], 16)


def test_weight_sync_in_buckets_while_asleep(model_config, m1_dir):
    """VeRL's order: sleep, weights from the trainer's per-tensor generator, wake up; then the new policy generates.
    load_format dummy, VeRL's default: the server starts from random weights and waits for the trainer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    new_policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m1_dir), dtype=torch.float32).eval()
    state = new_policy.state_dict()
    server = server_for(model_config, load_format="dummy")
    buckets = []

    async def send(shared, metas):
        buckets.append([m.name for m in metas])
        await server.receive_weights(shared, metas)

    async def scenario():
        await server.launch_server()
        old = await server.generate(PROMPTS[3], dict(GREEDY), "old")
        await server.sleep()
        count = await send_weights(iter(state.items()), send, bucket_bytes=1 << 16)
        await server.set_global_steps(3)
        await server.wake_up()
        return old, count, await server.generate(PROMPTS[3], dict(GREEDY), "new")

    old, count, new = asyncio.run(scenario())
    assert count == len(state) and sorted(n for b in buckets for n in b) == sorted(state)
    assert ["model.embed_tokens.weight"] in buckets and len(buckets) > 2  # the embedding (12 MB) travels alone
    assert new.token_ids == greedy_reference(new_policy, PROMPTS[3], 16) != old.token_ids
    assert new.extra_fields == {"global_steps": 3}


def test_sync_probe_reports_the_new_weights_on_wake_up(model_config, m1_dir, caplog):
    """With engine_kwargs.m1.sync_probe_tokens, each wake-up logs the weights' fingerprint and a greedy probe: the
    values of the policy just sent (every replica of a multi-GPU run must log the same)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(2)
    new_policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m1_dir), dtype=torch.float32).eval()
    server = server_for(model_config, load_format="dummy",
                        engine_kwargs={"m1": {"kv_cache_tokens": 2048, "block_size": 16, "sync_probe_tokens": 6}})

    async def scenario():
        await server.launch_server()
        await server.sleep()
        await send_weights(iter(new_policy.state_dict().items()), server.receive_weights, bucket_bytes=1 << 20)
        await server.set_global_steps(2)
        with caplog.at_level("WARNING", logger="m1_plugins.verl.server"):
            await server.wake_up()
        return await server.sync_probe()

    fingerprint, tokens = asyncio.run(scenario())
    assert fingerprint == torch.stack([p.double().sum() for p in new_policy.parameters()]).sum().item()
    assert tokens == greedy_reference(new_policy, PROBE_PROMPT, 6)
    assert f"m1 sync probe: replica 0, weights of step 2, fingerprint {fingerprint:.10e}, greedy {tokens}" in caplog.text


def test_refusals(model_config, smollm2_dir):
    with pytest.raises(ValueError, match="runs M1 hybrids .* is a 'llama' checkpoint. Convert it first"):
        server_for(HFModelConfig(path=str(smollm2_dir)))
    with pytest.raises(ValueError, match=r"41000 tokens .* max_position_embeddings \(40960\)"):
        server_for(model_config, prompt_length=1000, response_length=40000)
    with pytest.raises(NotImplementedError, match="tensor_model_parallel_size=1"):
        server_for(model_config, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"engine_kwargs.m1 has unknown keys \['gpu_blocks'\]"):
        server_for(model_config, engine_kwargs={"m1": {"gpu_blocks": 4}})
    with pytest.raises(NotImplementedError, match="hybrid mode"):
        M1Server(rollout_config(), model_config, RolloutMode.STANDALONE, replica_rank=0, cuda_visible_devices="")
    with pytest.raises(MemoryError, match="less than one sequence of max_model_len=48"):
        asyncio.run(server_for(model_config, engine_kwargs={"m1": {"kv_cache_tokens": 32, "block_size": 16}}).launch_server())

    server = server_for(model_config)

    async def scenario():
        await server.launch_server()
        with pytest.raises(NotImplementedError, match="text-only"):
            await server.generate(PROMPTS[0], dict(GREEDY), "img", image_data=["x"])
        with pytest.raises(ValueError, match="m1 engine refused request bad: prompt token ids must be in"):
            await server.generate([1, 10**6], dict(GREEDY), "bad")
        return await server.generate(PROMPTS[0], dict(GREEDY), "fine")  # a refused request leaves the engine working

    assert len(asyncio.run(scenario()).token_ids) == 16
