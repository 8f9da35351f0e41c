"""How far a model's bf16 forward is from its fp32 forward: KL(fp32 || bf16) of the next-token distributions.

    python benchmarks/bf16_sensitivity.py runs/demo/teacher runs/demo/hybrid runs/demo/distill

A model whose bf16 forward is far from its fp32 one cannot have a rollout engine and a trainer agree in bf16
(VeRL's `rollout_corr/kl`), however exact both are: the undistilled hybrid is such a model (docs/benchmarks.md,
GRPO section). Random tokens, so no data is needed; a few hundred positions are enough to separate the cases.
"""

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)


@torch.no_grad()
def log_probs(path, dtype, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model(ids).logits.float().log_softmax(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="HF checkpoint directories (Llama or M1).")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| model | KL(fp32 || bf16) mean | max |\n|---|---|---|")
    for path in args.models:
        generator = torch.Generator().manual_seed(args.seed)
        vocab = AutoConfig.from_pretrained(path).vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.length), generator=generator)
        fp32, bf16 = log_probs(path, torch.float32, ids), log_probs(path, torch.bfloat16, ids)
        kl = (fp32.exp() * (fp32 - bf16)).sum(-1)
        print(f"| {path} | {kl.mean():.4g} | {kl.max():.4g} |")


if __name__ == "__main__":
    main()
