"""The decode throughput each model could reach at its floor, by generation length: where the hybrid's advantage is.

For each generation length, each model runs at the largest batch whose sequences all fit in its KV pool (at most
--max-batch), and its step takes at least `step_lower_bound` of `step_traffic` at the mean context (the matrix
products bound by bytes or by FLOPs, the rest by bytes): the ratio of the two throughputs is the most a faster engine
could show on this GPU. Sizes (parameters, KV bytes per token, Mamba-state bytes per sequence, KV pool), the prompt
length and the GPU's peaks come from `m1 bench` JSON reports, one per model.

  python benchmarks/engine_floors.py docs/results/gpu/engine_bench_m1_b512_fp32state_h200_s7.json \
      docs/results/gpu/engine_bench_llama_b256_h200_s6.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m1_plugins.rollout.bench import step_lower_bound, step_traffic  # noqa: E402


def floors(report: dict, gen_lens: list[int], max_batch: int) -> list[tuple[int, float]]:
    """(batch, tokens/s at the floor) per generation length, for the report's (single) model."""
    (model,) = report["models"]
    s = report["settings"]
    out = []
    for gen in gen_lens:
        batch = min(max_batch, model["kv_capacity_tokens"] // (s["prompt_len"] + gen))
        traffic = step_traffic(model["params"] * getattr(torch, s["dtype"]).itemsize, model["state_bytes_per_seq"],
                               model["kv_bytes_per_token"], batch, batch * (s["prompt_len"] + gen / 2 + 1))
        step = step_lower_bound(traffic, model["params"], batch, s["peak_bandwidth"], s["peak_flops"])
        out.append((batch, batch / step))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hybrid", type=Path, help="`m1 bench --models m1 ... --out` JSON")
    parser.add_argument("transformer", type=Path, help="`m1 bench --models llama ... --out` JSON, same GPU")
    parser.add_argument("--gen-lens", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--max-batch", type=int, default=512)
    args = parser.parse_args()
    reports = [json.loads(p.read_text()) for p in (args.hybrid, args.transformer)]
    gen_lens = [int(g) for g in args.gen_lens.split(",")]
    hybrid, transformer = (floors(r, gen_lens, args.max_batch) for r in reports)
    s = reports[0]["settings"]
    print(f"Floors on {reports[0]['hardware'].get('gpu')}: {s['peak_bandwidth'] / 1e12:g} TB/s, "
          f"{s['peak_flops'] / 1e12:g} TFLOP/s, prompt {s['prompt_len']}, at most batch {args.max_batch}\n")
    print("| new tokens | hybrid batch | hybrid tok/s | Transformer batch | Transformer tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for gen, (b1, t1), (b2, t2) in zip(gen_lens, hybrid, transformer):
        print(f"| {gen:,} | {b1} | {t1:,.0f} | {b2} | {t2:,.0f} | {t1 / t2:.2f}x |")


if __name__ == "__main__":
    main()
