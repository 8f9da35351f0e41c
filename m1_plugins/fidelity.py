"""How closely a student (hybrid) follows its teacher, token by token, on held-out conversations."""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def fidelity_report(teacher, student, tokenizer, conversations, max_length: int = 512, progress: bool = True) -> dict:
    """Mean per-token KL(teacher || student), KL(student || teacher) (the distillation objective) and
    next-token (top-1) agreement, over every predicted token of the chat-rendered conversations."""
    totals = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "top1_agreement": 0.0}
    n_tokens = 0
    for messages in tqdm(conversations, desc="fidelity", disable=not progress):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        ids = ids[:, :max_length].to(next(student.parameters()).device)
        logp_t = F.log_softmax(teacher(ids).logits[0, :-1].float(), dim=-1)
        logp_s = F.log_softmax(student(ids).logits[0, :-1].float(), dim=-1)
        totals["kl_teacher_student"] += (logp_t.exp() * (logp_t - logp_s)).sum().item()
        totals["kl_student_teacher"] += (logp_s.exp() * (logp_s - logp_t)).sum().item()
        totals["top1_agreement"] += (logp_t.argmax(-1) == logp_s.argmax(-1)).sum().item()
        n_tokens += logp_t.shape[0]
    if n_tokens == 0:
        raise ValueError("fidelity_report got no tokens: pass at least one non-empty conversation.")
    return {**{k: v / n_tokens for k, v in totals.items()}, "tokens": n_tokens, "conversations": len(conversations)}
