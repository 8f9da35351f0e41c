"""Where a training step of the M1-3B shape spends its GPU time: torch.profiler, top CUDA kernels.

    PYTHONPATH=.device/site:. python benchmarks/profile_train_step.py --layout aligned --out runs/profile.md
"""

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import m1_plugins
from m1_plugins.convert import PAPER_ATTN_LAYERS

LAYOUTS = {"m1": dict(mamba_d_state=16, mamba_head_dim=16), "aligned": dict(mamba_d_state=128, mamba_head_dim=128, mamba_n_groups=24)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, default="aligned")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = m1_plugins.M1Config(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, attn_layers=PAPER_ATTN_LAYERS,
        attn_implementation="sdpa", mamba_kernels="cuda", **LAYOUTS[args.layout])
    model = m1_plugins.M1ForCausalLM(config).to("cuda", torch.bfloat16).train()
    docs = [1500, 2000, 1000, 1692, args.seq_len - 6192]
    position_ids = torch.cat([torch.arange(n) for n in docs])[None].cuda()
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device="cuda")

    def step():
        model(input_ids=ids, position_ids=position_ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    args.out.write_text(f"# profile: layout {args.layout}, {args.seq_len} tokens, bf16, one fwd+bwd\n\n```\n{table}\n```\n")
    print(table)


if __name__ == "__main__":
    main()
