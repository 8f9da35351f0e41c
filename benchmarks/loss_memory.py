"""GPU memory the distillation loss adds on top of the forward passes, at the M1 shape: one packed row of
8192 tokens x 128256 vocabulary, bf16 logits for student and teacher (as the models return them).

    python benchmarks/loss_memory.py --out loss_memory.json

Measured: peak allocated memory during loss forward + backward (dL/dlogits, as `torch.autograd.grad` returns it),
minus the memory held before the loss (the two logits tensors). "naive" upcasts both full rows to fp32 and takes
the KL in one go; "overwrite" is the trainer's setting (`overwrite_logits=True`: dL/dlogits replaces the logits).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from m1_plugins.losses import kl_divergence

TOKENS, VOCAB = 8192, 128256


def naive(student, teacher):
    log_s, log_t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    return (log_s.exp() * (log_s - log_t)).sum(-1).mean()


def measure(loss_fn):
    torch.manual_seed(0)
    student = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad, = torch.autograd.grad(loss_fn(student, teacher), student)
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    separate = grad.untyped_storage().data_ptr() != student.untyped_storage().data_ptr()
    grad_bytes = grad.numel() * grad.element_size() if separate else 0
    del student, teacher, grad
    torch.cuda.empty_cache()
    return {"added_GB": added / 1e9, "of_which_separate_grad_GB": grad_bytes / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {name: measure(fn) for name, fn in {
        "naive fp32": naive,
        "kl_divergence chunk 1024": lambda s, t: kl_divergence(s, t, chunk_size=1024),
        "kl_divergence chunk 512": lambda s, t: kl_divergence(s, t, chunk_size=512),
        "kl_divergence chunk 512, overwrite": lambda s, t: kl_divergence(s, t, chunk_size=512, overwrite_logits=True),
        "kl_divergence chunk 1024, overwrite": lambda s, t: kl_divergence(s, t, chunk_size=1024, overwrite_logits=True),
    }.items()}
    print(f"| loss ({TOKENS} tokens x {VOCAB} vocab, bf16 logits, {torch.cuda.get_device_name()}) | added over the logits | of which a separate dL/dlogits |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['added_GB']:.2f} GB | {r['of_which_separate_grad_GB']:.2f} GB |")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), **results}, indent=2))


if __name__ == "__main__":
    main()
