"""Sampling engines behind one interface: `Generator.generate(prompts, n, ...)` -> token ids.

`EngineGenerator` runs the M1 generation engine (continuous batching, one prefill shared by the n samples of a
prompt, CUDA graphs on GPU); `HFGenerator` runs `model.generate` on left-padded batches (M1ForCausalLM treats
left padding exactly: padding never enters the attention or the recurrent state).
"""

import time
from typing import Protocol

import torch


class Generator(Protocol):
    tokens_generated: int  # total generated tokens (EOS included) over all calls
    seconds: float  # total wall time spent in generate

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int) -> list[list[list[int]]]:
        """Sample n continuations of each prompt (token ids, no padding).

        Returns (len(prompts), n, generated length) nested lists: out[p][s] holds the ids generated for
        prompt p, sample s, ending with an EOS id when the sample stopped by itself (at most
        max_new_tokens ids). temperature 0 is greedy decoding; `seed` makes a call reproducible.
        """
        ...


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation config's EOS, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def engine_for(model, batch_size: int, max_model_len: int, whole_batch: bool = False):
    """An M1Engine for `model`; a Transformer (Llama) first becomes its all-attention M1 conversion, which computes
    the same function (tests/convert), so teacher and hybrid run on one engine. The KV pool holds the whole batch at
    full length on CPU, or with `whole_batch` (a GPU shared with other jobs: take only what the batch needs);
    otherwise, on GPU, it is planned from the free memory."""
    from ..modeling import M1ForCausalLM
    from ..rollout.engine import M1Engine, kv_tokens_for

    if not isinstance(model, M1ForCausalLM):
        from ..convert import convert_to_hybrid

        model = convert_to_hybrid(model, attn_layers=list(range(model.config.num_hidden_layers)), share_weights=True,
                                  progress=False)
    kv_tokens = kv_tokens_for(batch_size, max_model_len) if whole_batch or model.device.type == "cpu" else None
    return M1Engine(model, max_num_seqs=batch_size, max_model_len=max_model_len, kv_cache_tokens=kv_tokens)


class HFGenerator:
    """`Generator` over HF `model.generate`: the len(prompts) * n rows run in left-padded batches of
    `batch_size` rows. Sampling is plain temperature + top-p (top-k off)."""

    def __init__(self, model, pad_token_id: int, eos_token_ids: list[int], batch_size: int = 32):
        self.model, self.pad_token_id, self.eos_token_ids = model, pad_token_id, list(eos_token_ids)
        self.batch_size = batch_size
        self.tokens_generated, self.seconds = 0, 0.0

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        rows = [p for p in prompts for _ in range(n)]  # row r = prompt r // n, sample r % n
        outputs: list[list[int]] = []
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        device = next(self.model.parameters()).device
        torch.manual_seed(seed)
        start = time.perf_counter()
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in batch], device=device)  # (B, width)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)  # (B, width)
            generated = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **sampling,
                                            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids)
            outputs.extend(self._trim(row) for row in generated[:, width:].tolist())  # (B, <= max_new_tokens)
        self.tokens_generated += sum(len(o) for o in outputs)
        self.seconds += time.perf_counter() - start
        return [outputs[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _trim(self, row: list[int]) -> list[int]:
        """Cut a generated row after its first EOS (what follows is padding of a finished sample)."""
        for i, token in enumerate(row):
            if token in self.eos_token_ids:
                return row[:i + 1]
        return row


class EngineGenerator:
    """`Generator` over an `M1Engine`. Plain temperature + top-p; EOS ids stop a sample (and end it)."""

    def __init__(self, engine, eos_token_ids: list[int]):
        self.engine, self.eos_token_ids = engine, tuple(eos_token_ids)
        self.tokens_generated, self.seconds = 0, 0.0

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        from ..rollout import SamplingParams

        sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, n=n,
                                  stop_token_ids=self.eos_token_ids, logprobs=False)
        torch.manual_seed(seed)  # the engine's unseeded rows draw from torch's default generators
        start = time.perf_counter()
        outputs = self.engine.generate(prompts, sampling)
        self.seconds += time.perf_counter() - start
        refused = [o.error for o in outputs if o.error]
        if refused:
            raise ValueError(f"the engine refused {len(refused)} prompt(s): {refused[0]}")
        samples = [[s.token_ids for s in o.samples] for o in outputs]
        self.tokens_generated += sum(len(t) for per_prompt in samples for t in per_prompt)
        return samples
