"""`m1 bench`: generation throughput of the M1 engine, hybrid vs Transformer on the same engine.

Random weights in the Llama-3.2-3B shape: the M1 hybrid (6 attention layers of 28) and the all-attention model
(every layer attention: Llama-3.2-3B's computation, run by the same engine, so the comparison is of the
architectures, not of two code bases). Each point: `batch` prompts of `prompt_len` random tokens, greedy,
`ignore_eos`, `gen_len` new tokens each; warm-up runs first, then the mean of the timed runs.

Reported per point: generated tokens/s (batch x gen_len / wall time of `generate`, prefill included), ms per
decode step, the concurrency the KV pool allowed (most and mean sequences per step), preemptions, peak memory, and the
bytes a decode step must move, averaged over the steps run (weights once, the Mamba states of the sequences decoded
read + written, the KV of their whole contexts read, one token of KV each written) with the fraction of the
GPU's HBM bandwidth that reaches (roofline = bytes per step / step time / peak bandwidth). Above a batch of ~200 the
matrix products are compute-bound (2 x params x batch FLOPs against the weights' bytes), so a second fraction takes
the step's lower bound as max(weights / bandwidth, FLOPs / peak FLOP/s) + (state + KV) / bandwidth.
"""

import gc
import json
import statistics
import time
from pathlib import Path

import click
import torch

from ..benchmarking import (ATTN_LAYERS_3B, ATTN_LAYERS_TINY, SHAPE_3B, SHAPE_TINY, hardware, mixer_layout, param_count,
                            versions)
from ..modeling.cache import state_bytes_per_token
from .engine import M1Engine
from .sampling import SamplingParams

# peak HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s by GPU name (data sheets; the first key in the
# name wins); override with --peak-bandwidth / --peak-flops
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
MODELS = ("m1", "aligned", "llama")


def bench_config(name: str, tiny: bool, device, mamba_state_dtype: str = "float32"):
    from ..modeling import M1Config

    shape = SHAPE_TINY if tiny else SHAPE_3B
    layers = list(range(shape["num_hidden_layers"])) if name == "llama" else ATTN_LAYERS_TINY if tiny else ATTN_LAYERS_3B
    layout = {} if name == "llama" else mixer_layout(name, shape)
    return M1Config(**shape, attn_layers=layers, mamba_kernels="cuda" if device.type == "cuda" else "reference",
                    mamba_state_dtype=mamba_state_dtype, **layout)


def build(name, tiny, device, dtype, mamba_state_dtype="float32"):
    from ..modeling import M1ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return M1ForCausalLM(bench_config(name, tiny, device, mamba_state_dtype)).to(dtype).eval()


def step_traffic(weights: float, state_per_seq: float, kv_per_token: float, batch: float, kv_tokens: float) -> dict:
    """Minimum HBM bytes of one decode step of `batch` sequences that attend to `kv_tokens` context tokens in all:
    the weights once, each sequence's Mamba state read and written, the context's KV read (the new token's key and
    value written with it)."""
    state, kv = 2 * batch * state_per_seq, kv_tokens * kv_per_token
    return {"weights": weights, "state": state, "kv": kv, "total": weights + state + kv}


def step_lower_bound(traffic: dict, params: float, batch: float, bandwidth: float, peak_flops: float) -> float:
    """Seconds a decode step of `batch` sequences needs at least: the matrix products bound by bytes or FLOPs (every
    parameter is in one product per token, tied LM head included), the rest by bytes."""
    flops = 2 * params * batch
    return max(traffic["weights"] / bandwidth, flops / peak_flops) + (traffic["state"] + traffic["kv"]) / bandwidth


def gpu_peak(table, device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table.items() if key in name), None)


def run_point(engine, batch, prompt_len, gen_len, runs, vocab):
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
    sampling = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True, logprobs=False)
    results = []
    for _ in range(runs):
        stats_before = dict(vars(engine.stats))
        engine.stats.max_running = 0
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        assert all(len(o.samples[0].token_ids) == gen_len for o in outputs)
        s = engine.stats
        results.append({
            "seconds": seconds, "decode_s": s.decode_seconds - stats_before["decode_seconds"],
            "max_running": s.max_running, **{k: getattr(s, k) - stats_before[k] for k in (
                "decode_steps", "decode_rows", "decode_kv_tokens", "preemptions")},
        })
    return results


def bench_model(name, args, progress):
    device, dtype = args["device"], args["dtype"]
    model = build(name, args["tiny"], device, dtype, args["mamba_state_dtype"])
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = state_bytes_per_token(model.config, dtype.itemsize)
    max_len = args["prompt_len"] + max(args["gen_lens"])
    t0 = time.perf_counter()
    engine = M1Engine(model, max_num_seqs=max(args["batch_sizes"]), max_model_len=max_len,
                      gpu_memory_utilization=args["gpu_memory_utilization"], kv_cache_tokens=args["kv_cache_tokens"])
    setup_s = time.perf_counter() - t0
    capacity = (engine.stats.num_blocks - 1) * engine.block_size
    for batch, gen_len in args["points"]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = run_point(engine, batch, args["prompt_len"], min(gen_len, args["warmup_len"]), args["warmup"], model.config.vocab_size)
        timed = run_point(engine, batch, args["prompt_len"], gen_len, args["repeats"], model.config.vocab_size)
        seconds = statistics.mean(r["seconds"] for r in timed)
        step_s = statistics.mean(r["decode_s"] / r["decode_steps"] for r in timed)
        steps = sum(r["decode_steps"] for r in timed)
        mean_batch = sum(r["decode_rows"] for r in timed) / steps
        traffic = step_traffic(weight_bytes, sizes["mamba_bytes_per_sequence"], sizes["kv_bytes_per_token"], mean_batch,
                               sum(r["decode_kv_tokens"] for r in timed) / steps)  # means over the steps run
        row = {
            "model": name, "batch": batch, "gen_len": gen_len, "tokens_per_s": batch * gen_len / seconds,
            "seconds": [round(r["seconds"], 3) for r in timed], "ms_per_step": 1e3 * step_s,
            "max_running": max(r["max_running"] for r in timed), "mean_running": round(mean_batch, 2),
            "preemptions": sum(r["preemptions"] for r in timed),
            "gb_per_step": traffic["total"] / 1e9, "traffic_gb": {k: round(v / 1e9, 3) for k, v in traffic.items()},
            "warmup_s": [round(r["seconds"], 2) for r in warm],
        }
        if args["peak_bandwidth"]:
            row["roofline"] = traffic["total"] / step_s / args["peak_bandwidth"]
            if args["peak_flops"]:
                row["roofline_with_flops"] = step_lower_bound(traffic, params, mean_batch, args["peak_bandwidth"],
                                                              args["peak_flops"]) / step_s
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        progress(row)
    info = {"model": name, "params": params, "setup_s": round(setup_s, 1),
            "kv_capacity_tokens": capacity, "graph_captures": engine.stats.graph_captures,
            "state_bytes_per_seq": sizes["mamba_bytes_per_sequence"], "kv_bytes_per_token": sizes["kv_bytes_per_token"]}
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def _device_name(report) -> str:
    return report["hardware"].get("gpu", report["hardware"].get("cpu"))


def markdown(report) -> str:
    s = report["settings"]
    lines = [f"Generation throughput, M1 engine, {_device_name(report)}, {s['dtype']}, greedy, ignore_eos, "
             f"prompt {s['prompt_len']}, {s['warmup']} warm-up run(s) of {s['warmup_len']} tokens then the mean of "
             f"{s['repeats']} timed run(s); shape {s['shape']}, random weights.", "",
             "| model | batch | gen len | tokens/s | ms/step | running (max / mean) | preemptions | GB/step | HBM roofline "
             "| roofline with GEMM FLOPs | peak mem GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        roof = " | ".join(f"{r[k]:.0%}" if k in r else "-" for k in ("roofline", "roofline_with_flops"))
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['gen_len']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} "
                     f"| {r['max_running']} / {r['mean_running']:.0f} | {r['preemptions']} | {r['gb_per_step']:.2f} "
                     f"| {roof} | {mem} |")
    lines += [""] + [f"- {m['model']}: {param_count(m['params'])} params, KV pool {m['kv_capacity_tokens']:,} tokens, "
                     f"{m['kv_bytes_per_token']:,} KV bytes/token, {m['state_bytes_per_seq']:,} Mamba-state bytes/sequence, "
                     f"{m['graph_captures']} CUDA graphs, setup {m['setup_s']} s" for m in report["models"]]
    v = report["versions"]
    lines += ["", f"torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}, mamba_ssm {v['mamba_ssm']}, "
                  f"m1_plugins {v['m1_plugins']}, commit {v.get('git_commit')}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> str | None:
    """path (.png): tokens/s against the batch (one line per model and generation length) and against the generation
    length (one line per model and batch), for the series with two points or more. Returns why no plot was written,
    else None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("batch", "gen_len", "batch (sequences decoded together)"), ("gen_len", "batch", "new tokens per sequence")]
    series = []
    for x, fixed, label in panels:
        lines = {}
        for r in results:
            lines.setdefault((r["model"], r[fixed]), []).append((r[x], r["tokens_per_s"]))
        lines = {key: sorted(points) for key, points in lines.items() if len({p[0] for p in points}) > 1}
        if lines:
            series.append((fixed, label, lines))
    if not series:
        return "a line needs two batch sizes (or two --gen-lens) of one model"
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (fixed, label, lines) in zip(axes[0], series):
        for (model, value), points in lines.items():
            ax.plot(*zip(*points), "-o", label=f"{model}, {fixed.replace('_', ' ')} {value}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set(xlabel=label, ylabel="generated tokens/s", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _positive_ints(value: str, option: str) -> list[int]:
    """Comma-separated positive integers (batch sizes, lengths); anything else is refused naming the option."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected comma-separated positive integers such as 8,16,32, got {value!r}",
                                 param_hint=option)
    return [int(p) for p in parts]


@click.command("bench")
@click.option("--models", default="m1,llama", show_default=True, help=f"Comma-separated subset of {', '.join(MODELS)} "
              "(m1: the paper's mixer; aligned: the head-aligned mixer; llama: every layer attention).")
@click.option("--batch-sizes", default="8,16,32,64,128,256,512", show_default=True, help="Batch sweep at --gen-len.")
@click.option("--gen-len", type=click.IntRange(min=1), default=4096, show_default=True, help="New tokens per sequence in the batch sweep.")
@click.option("--length-batch", type=click.IntRange(min=1), default=128, show_default=True, help="Batch of the generation-length sweep.")
@click.option("--gen-lens", default="", help="Generation-length sweep at --length-batch, e.g. 1024,2048,...,32768 "
              "(empty: none).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed runs per point.")
@click.option("--warmup-len", type=click.IntRange(min=1), default=4096, show_default=True, help="New tokens of a warm-up run "
              "(shorter warm-ups still compile every kernel and fill every graph bucket).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per point (mean reported).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), help="Fix the KV pool size instead of planning it from free memory.")
@click.option("--peak-bandwidth", type=float, help="HBM bytes/s for the roofline (default: from the GPU's name).")
@click.option("--peak-flops", type=float, help="Dense bf16 FLOP/s for the roofline (default: from the GPU's name).")
@click.option("--mamba-state-dtype", type=click.Choice(["float32", "model"]), default="float32", show_default=True,
              help="SSM state slots in fp32 or in the model's dtype (bf16 on GPU: half the state traffic).")
@click.option("--tiny", is_flag=True, help="A tiny model of the same structure (CPU smoke test).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="JSON report, and next to it a .md table "
              "and a .png plot of tokens/s against batch and generation length (the plot needs matplotlib).")
def bench_command(models, batch_sizes, gen_len, length_batch, gen_lens, prompt_len, warmup, warmup_len, repeats,
                  gpu_memory_utilization, kv_cache_tokens, peak_bandwidth, peak_flops, mamba_state_dtype, tiny, out):
    """Tokens/s of the generation engine: the M1 hybrid vs the all-attention model, same engine, same harness."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if unknown := [m for m in names if m not in MODELS]:
        raise click.BadParameter(f"unknown models {unknown}; choose from {', '.join(MODELS)}", param_hint="--models")
    points = ([(b, gen_len) for b in _positive_ints(batch_sizes, "--batch-sizes")]
              + [(length_batch, g) for g in _positive_ints(gen_lens, "--gen-lens")])
    args = dict(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, tiny=tiny,
                prompt_len=prompt_len, points=points, batch_sizes=[b for b, _ in points], gen_lens=[g for _, g in points],
                warmup=warmup, warmup_len=warmup_len, repeats=repeats, gpu_memory_utilization=gpu_memory_utilization,
                mamba_state_dtype=mamba_state_dtype,
                kv_cache_tokens=kv_cache_tokens, peak_bandwidth=gpu_peak(PEAK_BANDWIDTH, device, peak_bandwidth),
                peak_flops=gpu_peak(PEAK_FLOPS, device, peak_flops))
    report = {"hardware": hardware(device), "versions": versions(), "results": [], "models": [],
              "settings": {"shape": "tiny" if tiny else "Llama-3.2-3B", "dtype": str(args["dtype"]).split(".")[-1],
                           "prompt_len": prompt_len, "points": points, "warmup": warmup, "warmup_len": warmup_len,
                           "repeats": repeats, "gpu_memory_utilization": gpu_memory_utilization,
                           "mamba_state_dtype": mamba_state_dtype,
                           "peak_bandwidth": args["peak_bandwidth"], "peak_flops": args["peak_flops"]}}
    from tqdm import tqdm

    def save():  # after every point: an interrupted run keeps what it measured; returns why there is no plot
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            out.with_suffix(".md").write_text(markdown(report))
            no_plot = plot(report["results"], out.with_suffix(".png"), f"M1 engine, {_device_name(report)}")
            if no_plot:  # the plot of an earlier run to this --out would not match this report
                out.with_suffix(".png").unlink(missing_ok=True)
            return no_plot
        return None

    with tqdm(total=len(names) * len(points), desc="bench", unit="point") as bar:
        def progress(row):
            report["results"].append(row)
            save()
            bar.update(1)
            bar.write(f"{row['model']:8s} batch {row['batch']:4d} gen {row['gen_len']:6d}: "
                      f"{row['tokens_per_s']:10,.0f} tok/s, {row['ms_per_step']:.2f} ms/step")
        no_plot = None
        for name in names:
            report["models"].append(bench_model(name, args, progress))
            no_plot = save()
    click.echo(markdown(report))
    if no_plot:
        click.echo(f"no plot {out.with_suffix('.png')}: {no_plot}.")



if __name__ == "__main__":
    bench_command()
