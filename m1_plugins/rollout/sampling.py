"""Sampling parameters and the sampler of the generation engine.

Log-probs: for every sampled token the engine returns log_softmax(logits / temperature)[token] — the
temperature-scaled distribution over the *whole* vocabulary, before top-k / top-p filtering (temperature 0,
greedy, uses temperature 1). This is the quantity VeRL's actor recomputes (it divides logits by the rollout
temperature and never filters), so engine and trainer log-probs are comparable token by token.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off. `seed` makes a request's samples reproducible
    whatever else is in the batch (its rows are then drawn with their own generators, one by one)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = True

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.n >= 1, f"n (samples per prompt) must be >= 1, got {self.n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (per row, 0 = off) and top-p (nucleus, 1 = off) exclude."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = drop | ((top_p[:, None] < 1) & (probs.cumsum(-1) - probs > top_p[:, None]))  # smallest prefix reaching top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits, temperature, top_k, top_p, params: list[SamplingParams], generators=None):
    """logits: (rows, vocab); per-row temperature / top_k / top_p tensors, and the rows' `params` (the same values
    on the host: what to compute is decided from them, so that sampling never waits for the GPU). Returns (tokens,
    logprobs), both (rows,) on the logits' device; logprobs is None when no row asks for them.

    `generators[i]` (or None) draws row i alone; the other rows share the default generator in one call.
    """
    want_logprobs = any(p.logprobs for p in params)
    all_greedy = all(p.temperature == 0 for p in params)
    if all_greedy and not want_logprobs:  # one read of the logits instead of several fp32 copies of them
        return logits.argmax(-1), None
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    tokens = logits.argmax(-1)
    if not all_greedy:
        filtered = scaled
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            filtered = filter_logits(scaled, top_k, top_p)
        # argmax(p / E) with E ~ Exp(1) draws from p: what torch.multinomial does for one sample, without the
        # device sync of its input check (the engine queues the next step while this one runs)
        noise = torch.empty_like(filtered).exponential_()
        for i, g in enumerate(generators or ()):
            if g is not None:
                noise[i].exponential_(generator=g)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would make 0 / 0 = NaN, argmax's pick
        tokens = torch.where(greedy, tokens, (filtered.softmax(-1) / noise).argmax(-1))
    if not want_logprobs:
        return tokens, None
    return tokens, scaled.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
