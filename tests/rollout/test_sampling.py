"""The sampler draws from the temperature-scaled, top-k / top-p filtered distribution (CPU, many rows at once)."""

import torch

from m1_plugins.rollout.sampling import SamplingParams, sample


def draw(probs, rows, temperature=1.0, top_k=0, top_p=1.0, generators=None):
    logits = probs.log().expand(rows, -1)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, logprobs=False)] * rows
    full = lambda v: torch.full((rows,), float(v))  # noqa: E731
    tokens, logprobs = sample(logits, full(temperature), full(top_k).long(), full(top_p), params, generators)
    assert logprobs is None
    return tokens


def test_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.45, 0.3, 0.15, 0.07, 0.03])
    rows = 40_000
    for kwargs, kept in (({}, 5), ({"top_k": 3}, 3), ({"top_p": 0.8}, 3)):  # top-p: 0.45 + 0.3 < 0.8 <= + 0.15
        counts = torch.bincount(draw(probs, rows, **kwargs), minlength=5) / rows
        expected = torch.cat([probs[:kept] / probs[:kept].sum(), torch.zeros(5 - kept)])
        assert (counts - expected).abs().max() < 0.01, (kwargs, counts, expected)
        assert counts[kept:].sum() == 0  # filtered tokens never drawn
    # temperature 2 flattens: p^(1/2), renormalised
    counts = torch.bincount(draw(probs, rows, temperature=2.0), minlength=5) / rows
    assert (counts - probs.sqrt() / probs.sqrt().sum()).abs().max() < 0.01
    # a row with its own generator draws the same token whatever the other rows draw (1,000 equally likely tokens)
    flat = torch.full((1000,), 1e-3)
    seeded = [draw(flat, 8, generators=[None] * 3 + [torch.Generator().manual_seed(7)] + [None] * 4) for _ in range(5)]
    assert len({int(t[3]) for t in seeded}) == 1 and len({int(t[0]) for t in seeded}) > 1
