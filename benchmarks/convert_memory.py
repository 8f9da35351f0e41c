"""Conversion time and peak memory (RSS) of `m1 convert` on the CPU, against the teacher's fp32 size.

    python benchmarks/convert_memory.py --shape 3b --workdir /tmp/m1-convert-bench   # Llama-3.2-3B shape
    python benchmarks/convert_memory.py --shape tiny                                  # seconds, for a smoke run

The teacher is a randomly initialised Llama of the given shape, saved as safetensors first; the
conversion runs in a fresh process whose peak RSS is read from getrusage.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               max_position_embeddings=131072),
    "tiny": dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32),
}
ATTN_LAYERS = {"3b": "3,8,13,18,23,27", "tiny": "2,7"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the teacher and hybrid are written.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="m1-convert-bench-"))
    teacher_dir, hybrid_dir = workdir / "teacher", workdir / "hybrid"

    config = LlamaConfig(**SHAPES[args.shape])
    if not teacher_dir.exists():
        print(f"building a random {args.shape} teacher in {teacher_dir} ...", flush=True)
        with torch.device("meta"):
            teacher = LlamaForCausalLM(config)
        teacher = teacher.to_empty(device="cpu")
        for p in teacher.parameters():
            torch.nn.init.normal_(p, std=0.02)
        teacher.tie_weights()  # to_empty gave lm_head its own tensor
        teacher.save_pretrained(teacher_dir)
        del teacher
    with torch.device("meta"):
        fp32_bytes = 4 * LlamaForCausalLM(config).num_parameters()

    cmd = [sys.executable, "-m", "m1_plugins.cli", "convert", "--teacher", str(teacher_dir), "--out", str(hybrid_dir),
           "--attn-layers", ATTN_LAYERS[args.shape], "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    result = {
        "shape": args.shape, "teacher_fp32_GB": fp32_bytes / 1e9, "peak_rss_GB": peak / 1e9,
        "peak_over_fp32_size": peak / fp32_bytes, "seconds_including_load_and_save": seconds,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print("| shape | teacher fp32 | peak RSS | peak / fp32 size | time (load+convert+save) |")
    print("|---|---|---|---|---|")
    print(f"| {args.shape} | {result['teacher_fp32_GB']:.2f} GB | {result['peak_rss_GB']:.2f} GB | "
          f"{result['peak_over_fp32_size']:.2f}x | {seconds:.0f} s |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
