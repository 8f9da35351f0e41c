"""How closely a student (hybrid) follows its teacher, token by token, on held-out conversations."""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

FIDELITY_LOG = "m1_fidelity.jsonl"  # a training run's held-out fidelity curve, in its output_dir (one JSON per line)


def chat_tokens(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], int]:
    """Token ids of a chat-rendered conversation (cut at `max_length`) and the index of its last turn's first
    token: the prompt is the rendering of the earlier turns with the generation prompt, a prefix of the whole."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(ids[:max_length]), min(len(prompt["input_ids"]), max_length)


@torch.no_grad()
def fidelity_report(teacher, student, tokenizer, conversations, max_length: int = 512, responses_only: bool = False,
                    progress: bool = True) -> dict:
    """Mean per-token KL(teacher || student) (forward), KL(student || teacher) (reverse, the distillation
    objective), in nats/token, and next-token (top-1) agreement. Scored over every predicted token of the
    chat-rendered conversations, or with `responses_only` over the tokens of each conversation's last turn
    (the answer; the prompt is context only)."""
    totals = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "top1_agreement": 0.0}
    n_tokens = 0
    device = next(student.parameters()).device
    for messages in tqdm(conversations, desc="fidelity", disable=not progress):
        ids, start = chat_tokens(tokenizer, messages, max_length)
        first = max(start - 1, 0) if responses_only else 0  # logits at position i predict token i + 1
        if len(ids) - 1 <= first:
            continue
        ids = torch.tensor([ids], device=device)
        logp_t = F.log_softmax(teacher(ids).logits[0, first:-1].float(), dim=-1)
        logp_s = F.log_softmax(student(ids).logits[0, first:-1].float(), dim=-1)
        totals["kl_teacher_student"] += (logp_t.exp() * (logp_t - logp_s)).sum().item()
        totals["kl_student_teacher"] += (logp_s.exp() * (logp_s - logp_t)).sum().item()
        totals["top1_agreement"] += (logp_t.argmax(-1) == logp_s.argmax(-1)).sum().item()
        n_tokens += logp_t.shape[0]
    if n_tokens == 0:
        raise ValueError("fidelity_report got no tokens to score: pass at least one conversation with a non-empty "
                         "last turn within max_length.")
    return {**{k: v / n_tokens for k, v in totals.items()}, "tokens": n_tokens, "conversations": len(conversations)}
