"""The host's share of an engine decode step: scheduling, step inputs, sampling bookkeeping, without the model.

The model's decode forward is replaced by fixed logits, so what is timed is the Python and tensor-building work that
the host does per decode step. On the GPU it overlaps the step's graph replay (the engine works one step behind the
GPU), so it costs nothing as long as it stays below the replay's time (~17 ms at batch 512 on an H200); this measures
that margin. Runs on CPU; the tiny model only sizes the cache.

  PYTHONPATH=. python benchmarks/host_overhead.py --batch-sizes 64,256,512
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m1_plugins.benchmarking import hardware, versions  # noqa: E402
from m1_plugins.rollout import M1Engine, SamplingParams  # noqa: E402
from m1_plugins.rollout.bench import build  # noqa: E402


def host_ms_per_step(batch: int, steps: int, repeats: int) -> list[float]:
    model = build("m1", True, torch.device("cpu"), torch.float32)
    engine = M1Engine(model, max_num_seqs=batch, max_model_len=2048, kv_cache_tokens=batch * 2048)
    sampling = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True, logprobs=False)
    for prompt in torch.randint(0, model.config.vocab_size, (batch, 16)).tolist():
        engine.add_request(prompt, sampling)
    while engine.waiting:
        engine.step()
    logits = torch.randn(batch, model.config.vocab_size)
    engine._decode_forward = lambda b: logits[:b]
    for _ in range(20):  # warm-up
        engine.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="64,256,512")
    p.add_argument("--steps", type=int, default=100, help="decode steps per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per batch size (a shared CPU is noisy)")
    args = p.parse_args()
    torch.set_num_threads(1)
    hw, v = hardware(torch.device("cpu")), versions()
    print(f"{hw.get('cpu')} ({hw['cpu_count']} cores), torch {v['torch']}, greedy without log-probs, "
          f"{args.repeats} blocks of {args.steps} decode steps\n")
    print("| batch | host ms per decode step, median | min |\n|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times = host_ms_per_step(batch, args.steps, args.repeats)
        print(f"| {batch} | {statistics.median(times):.2f} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
