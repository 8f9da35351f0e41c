"""`m1 generate` and `m1 bench` on CPU: real outputs from the engine, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from m1_plugins.modeling.cache import state_bytes_per_token
from m1_plugins.rollout.bench import bench_command, bench_config, step_lower_bound
from m1_plugins.rollout.generate_cli import generate_command


def test_generate_prints_samples(smollm2_dir, make_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = make_model(vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    args = ["--model", tmp_path / "tiny", "--prompt", "What is 2 + 2?", "--prompt", "Hi", "--n", 2, "--max-tokens", 5,
            "--seed", 3, "--json"]
    result = CliRunner().invoke(generate_command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("What is 2 + 2?", 0), ("What is 2 + 2?", 1), ("Hi", 0), ("Hi", 1)]
    assert all(len(r["token_ids"]) == len(r["logprobs"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    again = CliRunner().invoke(generate_command, [str(a) for a in args])
    assert again.stdout == result.stdout  # --seed


def test_generate_runs_a_llama_as_its_all_attention_conversion(smollm2_dir):
    """As `m1 eval` does: the same greedy tokens as transformers' own generate on the Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = CliRunner().invoke(generate_command, ["--model", str(smollm2_dir), "--prompt", "Hi", "--temperature", "0",
                                                   "--max-tokens", "6", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    llama = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = llama.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert row["token_ids"] == expected


def test_bench_tiny_writes_a_table(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--tiny", "--models", "m1,llama", "--batch-sizes", "2,3", "--gen-len", 8, "--gen-lens", "4",
            "--length-batch", 3, "--warmup", 1, "--warmup-len", 2, "--repeats", 1, "--out", out,
            "--peak-bandwidth", 1e10, "--peak-flops", 1e12, "--mamba-state-dtype", "model"]
    result = CliRunner().invoke(bench_command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(r["model"], r["batch"], r["gen_len"]) for r in report["results"]] == [
        ("m1", 2, 8), ("m1", 3, 8), ("m1", 3, 4), ("llama", 2, 8), ("llama", 3, 8), ("llama", 3, 4)]
    assert all(r["tokens_per_s"] > 0 and r["max_running"] == r["batch"] for r in report["results"])
    assert report["settings"]["mamba_state_dtype"] == "model"
    # counting the matrix products' FLOPs can only raise the lower bound of a step
    assert all(r["roofline_with_flops"] >= r["roofline"] * (1 - 1e-9) > 0 for r in report["results"])
    assert "| m1 | 2 | 8 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # against batch and against length
    assert f"- m1: {report['models'][0]['params'] / 1e6:.3f}M params, KV pool" in result.output  # not 0.000B
    # a pool of 6 blocks of 64 tokens for 4 sequences of 3 blocks: preemption, so fewer sequences per step on average,
    # and the traffic is charged for the steps as they ran
    tight = CliRunner().invoke(bench_command, [str(a) for a in [
        "--tiny", "--models", "m1", "--batch-sizes", 4, "--gen-len", 180, "--prompt-len", 8, "--kv-cache-tokens", 384,
        "--warmup", 0, "--repeats", 1, "--out", out]])
    assert tight.exit_code == 0, tight.output
    assert tight.stdout.endswith(f"no plot {out.with_suffix('.png')}: a line needs two batch sizes (or two --gen-lens) "
                                 "of one model.\n")
    assert not out.with_suffix(".png").exists()  # the first run's plot is not left beside this report
    (row,) = json.loads(out.read_text())["results"]
    assert row["preemptions"] > 0 and row["max_running"] > row["mean_running"] > 1
    bad = CliRunner().invoke(bench_command, ["--models", "gpt"])
    assert bad.exit_code != 0 and "unknown models ['gpt']" in bad.output


def test_step_lower_bound_counts_flops_once_the_products_are_compute_bound():
    # the M1-3B step at batch 512 on an H200 (docs/benchmarks.md): 7.42 GB of weights, 5.68 GB of state,
    # 29.0 GB of KV, 2 x 3.71e9 x 512 FLOPs
    traffic = {"weights": 7.423e9, "state": 5.675e9, "kv": 29.004e9}
    bound = step_lower_bound(traffic, 3.711e9, 512, 4.8e12, 989e12)
    assert bound == pytest.approx(3.842e-3 + 34.679e9 / 4.8e12, rel=1e-3)  # 11.07 ms: FLOPs, not bytes, bound the GEMMs
    # at batch 8 the weights' bytes bound them
    assert step_lower_bound(traffic, 3.711e9, 8, 4.8e12, 989e12) == pytest.approx(sum(traffic.values()) / 4.8e12)


def test_bf16_state_halves_the_ssm_state_bytes():
    cpu = torch.device("cpu")
    fp32, bf16 = (state_bytes_per_token(bench_config("m1", False, cpu, d), 2)["mamba_bytes_per_sequence"]
                  for d in ("float32", "model"))
    # M1-3B: 22 Mamba layers x (SSM 3072 x 16 fp32 or bf16 + conv 9216 x 3 bf16)
    assert (fp32, bf16) == (22 * (3072 * 16 * 4 + 9216 * 3 * 2), 22 * (3072 * 16 * 2 + 9216 * 3 * 2))


def test_engine_floors_from_the_recorded_reports():
    """benchmarks/engine_floors.py on the committed H200 reports: the ceilings docs/benchmarks.md quotes for the
    3.5x target (M1 at 512 against the all-attention model at 251 sequences of 4,352 tokens: 2.85x)."""
    root = Path(__file__).resolve().parents[2]
    reports = [root / "docs/results/gpu" / f for f in ("engine_bench_m1_b512_fp32state_h200_s7.json",
                                                       "engine_bench_llama_b256_h200_s6.json")]
    result = subprocess.run([sys.executable, root / "benchmarks/engine_floors.py", *reports, "--gen-lens", "4096,32768"],
                            capture_output=True, text=True, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 4,096") or line.startswith("| 32,768")]
    assert rows == ["| 4,096 | 512 | 46,262 | 251 | 16,241 | 2.85x |", "| 32,768 | 146 | 10,193 | 33 | 2,282 | 4.47x |"]
