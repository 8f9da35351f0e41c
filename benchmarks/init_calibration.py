"""How far the converted hybrid starts from its teacher, by initialisation, before any training step:
MambaInLlama's random z gate or the open gate, each as converted and with its gated-norm scales fitted to the
teacher (what `m1_align` does before its first step). Fidelity on the teacher's own greedy answers to held-out
prompts, answer tokens only.

    python benchmarks/init_calibration.py runs/demo/teacher --answers runs/demo/teacher_answers.jsonl

The answers file is the one `m1 demo` (or `m1 data --teacher ... --seed 10000`) writes; the norm scales are fitted
on --calib-size training conversations (seed 0) of the same task.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)
from m1_plugins import align
from m1_plugins.convert import convert_to_hybrid, spaced_attn_layers
from m1_plugins.data import reasoning_gym_conversations
from m1_plugins.fidelity import fidelity_report


def calibration_batch(tokenizer, task: str, size: int, max_length: int) -> dict:
    """`size` training conversations as one packed row (position_ids restart per document)."""
    ids, positions = [], []
    for messages in reasoning_gym_conversations(task, size=size, seed=0):
        row = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:max_length]
        ids += row
        positions += range(len(row))
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="Llama checkpoint directory (e.g. runs/demo/teacher).")
    parser.add_argument("--answers", required=True, help="JSONL of the teacher's answers to held-out prompts.")
    parser.add_argument("--num-attn-layers", type=int, default=6)
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--calib-size", type=int, default=4, help="Training conversations the norm scales are fitted on.")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    wrapped = convert_to_hybrid(teacher, list(range(teacher.config.num_hidden_layers)), progress=False)  # hookable
    held_out = [json.loads(line)["messages"] for line in open(args.answers)]
    batch = calibration_batch(tokenizer, args.task, args.calib_size, 512)
    layers = spaced_attn_layers(teacher.config.num_hidden_layers, args.num_attn_layers)
    rows = ["| z gate | norm scales | KL(student ‖ teacher) | KL(teacher ‖ student) | top-1 agreement |", "|---|---|---|---|---|"]
    for gate in ("random", "open"):
        student = convert_to_hybrid(teacher, layers, gate=gate, progress=False)
        for fitted in (False, True):
            if fitted:
                captured = align.capture_teacher(wrapped, batch, align.mamba_layers(student.config), keep_pre_o=True)
                align.fit_norm_scales(student, captured)
            r = fidelity_report(teacher, student, tokenizer, held_out, max_length=1024, responses_only=True, progress=False)
            rows.append(f"| {gate} | {'fitted' if fitted else 'ones'} | {r['kl_student_teacher']:.2f} | "
                        f"{r['kl_teacher_student']:.2f} | {r['top1_agreement']:.1%} |")
            print(rows[-1], flush=True)
    print(f"\n{r['tokens']} answer tokens of {len(held_out)} held-out answers; norm scales fitted on "
          f"{batch['input_ids'].shape[1]} tokens\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
