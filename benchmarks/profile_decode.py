"""Where a decode step of the engine spends its time (3B shape, random weights, one GPU).

Splits a step into: the CUDA-graph replay (the model), the sampler, and the host-side scheduling; then lists the
kernels of one eager decode forward by total GPU time (torch.profiler).

  PYTHONPATH=.device/site:. python benchmarks/profile_decode.py --model m1 --batch 64 --context 512
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m1_plugins.rollout import M1Engine, SamplingParams  # noqa: E402
from m1_plugins.rollout.bench import build  # noqa: E402
from m1_plugins.rollout.sampling import sample  # noqa: E402


def cuda_ms(fn, repeats=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="m1", choices=["m1", "aligned", "llama"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=512, help="prompt length of the sequences being decoded")
    p.add_argument("--kernels", type=int, default=25, help="kernels to list")
    p.add_argument("--no-compile", action="store_true", help="decode with the plain (uncompiled) model")
    args = p.parse_args()
    model = build(args.model, False, torch.device("cuda"), torch.bfloat16)
    t0 = time.perf_counter()
    engine = M1Engine(model, max_num_seqs=args.batch, max_model_len=args.context + 256, compile=not args.no_compile)
    print(f"engine setup (memory plan, compile, {engine.stats.graph_captures} graph captures): {time.perf_counter() - t0:.1f} s")
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.context)).tolist()
    for p_ in prompts:
        engine.add_request(p_, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, logprobs=False))
    while engine.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    bucket = next(b for b in engine._buckets if b >= args.batch)
    graph, logits = engine._graphs[bucket]
    replay = cuda_ms(graph.replay)
    ones = torch.ones(args.batch, device="cuda")
    greedy = [SamplingParams(temperature=0, logprobs=False)] * args.batch  # the engine's rows of this profile
    sampler = cuda_ms(lambda: sample(logits, 0 * ones, ones.long() * 0, ones, greedy))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step()
    step = (time.perf_counter() - t0) / 20 * 1e3
    print(f"{args.model}{' (not compiled)' if args.no_compile else ''} batch {args.batch} context ~{args.context}: step {step:.2f} ms = graph replay {replay:.2f} ms"
          f" + sampler {sampler:.2f} ms + host not hidden behind them {step - replay - sampler:.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine._decode_forward(bucket)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels, max_name_column_width=70))


if __name__ == "__main__":
    main()
