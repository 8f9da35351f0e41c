"""Training throughput of M1 hybrids vs transformers' Llama, at the Llama-3.2-3B shape (random weights).

One training step = forward + loss + backward of one packed row (batch 1) of `--seq-len` tokens, bf16 weights,
sdpa attention, gradient checkpointing off. The row holds several documents (position_ids restart at 0 every
~1-2k tokens, the same documents for every model), so every model does exact packing: M1 through seq_idx and its
block-diagonal mask, Llama through transformers' packed-sequence mask (detected from position_ids when no
attention_mask and no cache are given). By default no optimizer runs: gradients are reset (set to None) after
each backward, so the numbers are the model's forward+backward cost; `--optimizer adamw` adds a torch AdamW step.

Models (`--models`):
  llama        LlamaForCausalLM, the baseline
  m1           M1 hybrid, 6 attention layers [3, 8, 13, 18, 23, 27], the paper's mixer: d_state 16, SSM head 16
  m1-xb3       the same with the learned x/B expansion (mamba_xb_expansion=3)
  aligned      head-aligned mixer: d_state = SSM head_dim = 128, 24 groups (one per attention head)
  aligned-xb3  the same with mamba_xb_expansion=3

mamba-ssm's Triton kernels are autotuned on first use (~10 configs per kernel, ~15 kernels per layout, each
compiled once): several minutes if done in one process. On a GPU the script first compiles every config in
parallel worker processes (one config index per worker, same shapes as the model) into Triton's on-disk cache,
so the in-process autotuning only loads and times them (`--no-precompile` to skip). The JSON reports the time
spent there and each model's first (JIT) steps.

  PYTHONPATH=.device/site:. python benchmarks/train_throughput.py --out runs/train_throughput.json
  python benchmarks/train_throughput.py --tiny --out /tmp/tt.json          # CPU smoke test, tiny shape
"""

import argparse
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

# fewer fragmentation OOMs near the 80 GB of an H100 (read at the first CUDA allocation)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: m1_plugins from the repo
    sys.path.insert(0, str(REPO))

from m1_plugins.benchmarking import (  # noqa: E402
    ATTN_LAYERS_3B, ATTN_LAYERS_TINY, SHAPE_3B, SHAPE_TINY, hardware, mixer_layout, param_count, sync, versions,
)

MODELS = ("llama", "m1", "m1-xb3", "aligned", "aligned-xb3")


def make_config(name, args):
    from transformers import LlamaConfig

    from m1_plugins import M1Config

    shape = SHAPE_TINY if args.tiny else SHAPE_3B
    if name == "llama":
        config = LlamaConfig(**shape)
    else:
        config = M1Config(**shape, attn_layers=ATTN_LAYERS_TINY if args.tiny else ATTN_LAYERS_3B,
                          mamba_kernels="cuda" if args.device.type == "cuda" else "reference",
                          **mixer_layout(name, shape))
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def build_model(name, args):
    from transformers import LlamaForCausalLM

    from m1_plugins import M1ForCausalLM

    config = make_config(name, args)
    cls = LlamaForCausalLM if name == "llama" else M1ForCausalLM
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise on the GPU (seconds, not minutes of CPU init)
        model = cls(config)
    model = model.to(args.dtype).train()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        raise RuntimeError(f"{name}: attention implementation is {model.config._attn_implementation}, not sdpa")
    return model


def make_batch(args, vocab_size):
    """One packed row: documents of random lengths in [doc_min, doc_max] (the last one cut), seeded."""
    rng = random.Random(args.seed)
    lengths, total = [], 0
    while total < args.seq_len:
        n = min(rng.randint(args.doc_min, args.doc_max), args.seq_len - total)
        lengths.append(n)
        total += n
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (1, args.seq_len), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids.to(args.device), position_ids.to(args.device), lengths


# ---------------------------------------------------------------------------------------------------------------
# parallel Triton precompilation

def mamba_autotuners():
    from m1_plugins.ops._kernels import mamba_autotuners as autotuners

    return autotuners(("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_combined", "ssd_state_passing"))


def precompile_worker(args):
    """Run one mixer layer's forward+backward per layout with a single config of every autotuned kernel, for the
    config indices worker, worker + stride, ...: this compiles them into Triton's on-disk cache, with the same
    shapes, dtypes and strides as the model (hence the same specialisations)."""
    from m1_plugins.modeling.modeling_m1 import M1Mamba2Mixer
    from m1_plugins.modeling.packing import seq_idx_from_position_ids
    from m1_plugins.ops import load_kernels

    if load_kernels() is None:
        raise SystemExit("mamba-ssm kernels unavailable")
    tuners = [t for t in mamba_autotuners() if len(t.configs) > 1]
    all_configs = {id(t): list(t.configs) for t in tuners}
    n_configs = max(len(c) for c in all_configs.values())
    for index in range(args.precompile_worker, n_configs, args.precompile_stride):
        for tuner in tuners:
            configs = all_configs[id(tuner)]
            tuner.configs = [configs[index] if index < len(configs) else configs[0]]
        for name in args.models:
            try:
                config = make_config(name, args)
                torch.manual_seed(0)
                with torch.device(args.device):
                    mixer = M1Mamba2Mixer(config, layer_idx=0)
                mixer = mixer.to(args.dtype)
                _, position_ids, _ = make_batch(args, config.vocab_size)
                hidden = torch.randn(1, args.seq_len, config.hidden_size, device=args.device, dtype=args.dtype,
                                     requires_grad=True)
                mixer(hidden, seq_idx=seq_idx_from_position_ids(position_ids)).float().square().mean().backward()
                sync(args.device)
                del mixer, hidden
                torch.cuda.empty_cache()  # these workers share the GPU with each other (and with the tests)
            except Exception as err:  # noqa: BLE001  (e.g. a config out of resources: the rest still compiles)
                print(f"worker {args.precompile_worker}: config index {index}, {name}: {err!r}"[:500], flush=True)
        print(f"worker {args.precompile_worker}: config index {index} done", flush=True)


def precompile(args, names):
    """Compile every autotune config of the Mamba-2 kernels for these models' layouts, in parallel processes."""
    from m1_plugins.ops import load_kernels

    if load_kernels() is None:
        raise RuntimeError("mamba-ssm kernels unavailable")
    n_configs = max(len(t.configs) for t in mamba_autotuners())
    n = min(n_configs, args.precompile_workers or max(1, (os.cpu_count() or 2) - 1))
    # one layout per distinct mixer (xb3 variants use the same scan shapes as their base layout)
    layouts = sorted({name.removesuffix("-xb3") for name in names})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--models", ",".join(layouts), "--seq-len", str(args.seq_len),
           "--doc-min", str(args.doc_min), "--doc-max", str(args.doc_max), "--seed", str(args.seed),
           "--dtype", args.dtype_name] + (["--tiny"] if args.tiny else [])
    t0 = time.perf_counter()
    print(f"precompiling mamba-ssm Triton kernels for {layouts}: {n} worker processes ...", flush=True)
    procs = [subprocess.Popen(cmd + ["--precompile-worker", str(i), "--precompile-stride", str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    failed = []
    for i, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(10.0, args.precompile_timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failed.append(i)
            print(f"  worker {i}: timed out", flush=True)
            continue
        if proc.returncode:
            failed.append(i)
            print(f"  worker {i} exited {proc.returncode}: ...{out[-600:]}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"precompile done in {seconds:.0f} s ({len(failed)} of {n} workers failed; their configs compile "
          "in-process instead)", flush=True)
    return {"seconds": round(seconds, 1), "workers": n, "config_indices": n_configs, "failed_workers": failed,
            "layouts": layouts}


# ---------------------------------------------------------------------------------------------------------------
# the benchmark

def bench_model(name, args, batch, deadline):
    from tqdm import tqdm

    ids, position_ids, _ = batch
    device = args.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    model = build_model(name, args)
    sync(device)
    build_s = time.perf_counter() - t_build
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    result = {"model": name, "params": params, "params_non_embedding": params - embed, "build_s": round(build_s, 1)}
    if name != "llama":
        from m1_plugins.ops import resolve_backend

        c = model.config
        result["mamba_backend"] = resolve_backend(c.mamba_kernels, device)
        result["layout"] = {k: getattr(c, k) for k in ("mamba_d_state", "mamba_head_dim", "mamba_n_groups",
                                                      "mamba_xb_expansion", "mamba_chunk_size", "attn_layers")}
        result["layout"]["mamba_n_heads"] = c.mamba_n_heads
    else:
        from transformers.masking_utils import find_packed_sequence_indices

        result["packed_mask_detected"] = find_packed_sequence_indices(position_ids) is not None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda") \
        if args.optimizer == "adamw" else None

    def step():
        out = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return out.loss.detach()

    times, warm, losses = [], [], []
    bar = tqdm(total=args.warmup + args.steps, desc=f"{name:12s}", unit="step", mininterval=2.0, file=sys.stderr,
               dynamic_ncols=False, ncols=100)
    for i in range(args.warmup + args.steps):
        if i >= args.warmup and time.perf_counter() > deadline and times:
            result["stopped_early"] = f"time budget reached after {len(times)} timed steps"
            break
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        dt = time.perf_counter() - t0
        (warm if i < args.warmup else times).append(dt)
        losses.append(float(loss))
        bar.update(1)
        bar.set_postfix_str(f"{dt * 1e3:.0f} ms")
    bar.close()
    if not all(math.isfinite(v) for v in losses):
        result["warning"] = f"non-finite loss: {losses}"
    ms = [t * 1e3 for t in times]
    result.update(
        warmup_s=[round(t, 2) for t in warm],
        timed_steps=len(times),
        ms_per_step=round(statistics.mean(ms), 2) if ms else None,
        ms_per_step_std=round(statistics.stdev(ms), 2) if len(ms) > 1 else 0.0,
        ms_per_step_median=round(statistics.median(ms), 2) if ms else None,
        tokens_per_s=round(args.seq_len / statistics.mean(times), 1) if times else None,
        loss_first=losses[0] if losses else None,
    )
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(report):
    res = report["results"]
    llama = next((r for r in res if r["model"] == "llama" and r.get("tokens_per_s")), None)
    s = report["settings"]
    hw = report["hardware"]
    lines = [
        f"Training throughput, forward+backward{' + AdamW' if s['optimizer'] == 'adamw' else ''}: "
        f"{hw.get('gpu', hw.get('cpu'))}, {s['dtype']}, 1 packed row of {s['seq_len']} tokens "
        f"({s['documents']} documents), sdpa, no gradient checkpointing, {s['steps']} timed steps after "
        f"{s['warmup']} warm-up steps; shape {s['shape']}.",
        "",
        "| model | params | tokens/s | ms/step (mean ± std) | peak mem GiB | vs Llama | warm-up steps s (JIT) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res:
        if r.get("error"):
            lines.append(f"| {r['model']} | | | {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / llama['tokens_per_s']:.2f}x" if llama and r.get("tokens_per_s") else "-"
        mem = r.get("peak_mem_gib", "-")
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        warm = ", ".join(f"{t:.1f}" for t in r.get("warmup_s", []))
        lines.append(f"| {r['model']} | {param_count(r['params'])} | {tps} | {r['ms_per_step']} ± {r['ms_per_step_std']}"
                     f" | {mem} | {ratio} | {warm} |")
    p = report.get("precompile") or {}
    if "seconds" in p:
        lines += ["", f"Triton precompile (all autotune configs, {p['workers']} parallel processes, layouts "
                      f"{p['layouts']}): {p['seconds']} s{', ' + p['ran'] if p.get('ran') else ''}; failed workers: "
                      f"{p['failed_workers'] or 'none'}. The warm-up column still includes in-process autotuning "
                      "(timing every config) and loading the compiled kernels."]
    elif p:
        lines += ["", f"Triton precompile: {p}"]
    if report.get("skipped"):
        lines += ["", f"Skipped (time budget): {', '.join(report['skipped'])}."]
    v = report["versions"]
    lines += ["", f"torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}, "
                  f"mamba_ssm {v['mamba_ssm']}, causal_conv1d {v['causal_conv1d']}, m1_plugins {v['m1_plugins']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model (the first includes Triton JIT)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (8192; 1024 with --tiny)")
    p.add_argument("--doc-min", type=int, default=None, help="shortest document (1024; 64 with --tiny)")
    p.add_argument("--doc-max", type=int, default=None, help="longest document (2048; 256 with --tiny)")
    p.add_argument("--dtype", dest="dtype_name", default=None, choices=["bf16", "fp32"],
                   help="weights/activations (bf16; fp32 on CPU)")
    p.add_argument("--optimizer", default="none", choices=["none", "adamw"],
                   help="none: backward and reset grads (default); adamw: add a torch AdamW step")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here (and the markdown table next to it)")
    p.add_argument("--md", default=None, help="markdown table path (default: --out with .md)")
    p.add_argument("--time-budget", type=float, default=450.0,
                   help="seconds; models not started by then are skipped, and timing stops early (default 450)")
    p.add_argument("--no-precompile", action="store_true", help="skip the parallel Triton precompilation")
    p.add_argument("--precompile-only", action="store_true",
                   help="only precompile (its JSON goes to --out), e.g. in the background while other work runs")
    p.add_argument("--precompile-info", default=None, help="JSON of an earlier --precompile-only run, for the report")
    p.add_argument("--precompile-workers", type=int, default=None, help="worker processes (default: CPUs - 1)")
    p.add_argument("--precompile-timeout", type=float, default=240.0)
    p.add_argument("--precompile-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--precompile-stride", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.seq_len = args.seq_len or (1024 if args.tiny else 8192)
    args.doc_min = args.doc_min or (64 if args.tiny else 1024)
    args.doc_max = args.doc_max or (256 if args.tiny else 2048)
    args.dtype_name = args.dtype_name or ("bf16" if args.device.type == "cuda" else "fp32")
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype_name]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.precompile_worker is not None:
        precompile_worker(args)
        return
    if args.precompile_only:
        names = [m for m in args.models if m != "llama"]
        info = precompile(args, names) if args.device.type == "cuda" and names else {"skipped": "no GPU or no M1 model"}
        print(json.dumps(info), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(info, indent=1))
        return
    start = time.perf_counter()
    deadline = start + args.time_budget
    out = Path(args.out) if args.out else None
    md = Path(args.md) if args.md else (out.with_suffix(".md") if out else None)
    vocab = (SHAPE_TINY if args.tiny else SHAPE_3B)["vocab_size"]
    batch = make_batch(args, vocab)
    report = {
        "hardware": hardware(args.device),
        "versions": versions(),
        "settings": {
            "shape": "tiny" if args.tiny else "Llama-3.2-3B", "dtype": args.dtype_name, "seq_len": args.seq_len,
            "batch_rows": 1, "documents": len(batch[2]), "document_lengths": batch[2], "steps": args.steps,
            "warmup": args.warmup, "optimizer": args.optimizer, "attn_implementation": "sdpa",
            "gradient_checkpointing": False, "models": args.models, "seed": args.seed,
            "timing": "wall clock per step between torch.cuda.synchronize() calls; tokens/s = seq_len / mean",
        },
        "results": [],
    }
    print(json.dumps({k: report[k] for k in ("hardware", "versions")}, indent=1), flush=True)
    m1_models = [m for m in args.models if m != "llama"]
    if args.precompile_info and Path(args.precompile_info).is_file():
        report["precompile"] = json.loads(Path(args.precompile_info).read_text())
        report["precompile"]["ran"] = "beforehand (--precompile-only), overlapping other work"
    elif args.device.type == "cuda" and m1_models and not args.no_precompile:
        try:
            report["precompile"] = precompile(args, m1_models)
        except Exception as err:  # noqa: BLE001  (it only saves time)
            report["precompile"] = {"error": repr(err)}
            print(f"precompile failed ({err!r}); the kernels compile in-process", flush=True)
    skipped = []
    for name in args.models:
        if time.perf_counter() > deadline:
            skipped.append(name)
            continue
        try:
            result = bench_model(name, args, batch, deadline)
        except Exception as err:  # noqa: BLE001  (one model's failure must not lose the others' numbers)
            kind = "OOM" if isinstance(err, torch.cuda.OutOfMemoryError) else type(err).__name__
            result = {"model": name, "error": f"{kind}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
            if args.device.type == "cuda":
                result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
            traceback.print_exc()
        gc.collect()  # after the except block: the traceback (and the model in its frames) is gone by now
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        report["results"].append(result)
        report["skipped"] = skipped
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result), flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            md.write_text(markdown(report))
    report["skipped"] = skipped
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    text = markdown(report)
    print("\n" + text, flush=True)
    if out:
        out.write_text(json.dumps(report, indent=1))
        md.write_text(text)


if __name__ == "__main__":
    main()
