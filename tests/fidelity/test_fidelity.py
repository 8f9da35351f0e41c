"""fidelity_report: the response-only scoring against a hand computation, and a model against itself."""

import pytest
import torch
import torch.nn.functional as F

from m1_plugins.fidelity import fidelity_report

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5, so \\boxed{5}."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


def by_hand(teacher, student, tokenizer, responses_only: bool) -> dict:
    """The three scores summed position by position, with F.kl_div, over the answer's tokens (or all of them)."""
    sums, n = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "top1_agreement": 0.0}, 0
    for messages in CONVERSATIONS:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        assert ids[:len(prompt)] == prompt  # the prompt is a prefix: the answer's tokens are ids[len(prompt):]
        targets = range(len(prompt), len(ids)) if responses_only else range(1, len(ids))
        with torch.no_grad():
            logits_t = teacher(torch.tensor([ids])).logits[0]
            logits_s = student(torch.tensor([ids])).logits[0]
        for target in targets:  # the distribution over token `target` comes from position target - 1
            logp_t, logp_s = F.log_softmax(logits_t[target - 1], -1), F.log_softmax(logits_s[target - 1], -1)
            sums["kl_teacher_student"] += F.kl_div(logp_s, logp_t, log_target=True, reduction="sum").item()
            sums["kl_student_teacher"] += F.kl_div(logp_t, logp_s, log_target=True, reduction="sum").item()
            sums["top1_agreement"] += float(logp_t.argmax() == logp_s.argmax())
            n += 1
    return {**{k: v / n for k, v in sums.items()}, "tokens": n}


@pytest.mark.parametrize("responses_only", [True, False])
def test_scores_equal_a_hand_computation(tiny_model, tiny_tokenizer, responses_only):
    teacher, student = tiny_model(seed=0), tiny_model(seed=1, attn_layers=[2])
    got = fidelity_report(teacher, student, tiny_tokenizer, CONVERSATIONS, max_length=512,
                          responses_only=responses_only, progress=False)
    expected = by_hand(teacher, student, tiny_tokenizer, responses_only)
    assert got["tokens"] == expected["tokens"] and got["conversations"] == 2
    for key in ("kl_teacher_student", "kl_student_teacher", "top1_agreement"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert got["kl_student_teacher"] > 0.01  # two random models: the comparison is not vacuous
    if responses_only:
        answers = sum(len(tiny_tokenizer(m[1]["content"])["input_ids"]) + 2 for m in CONVERSATIONS)  # + <|im_end|>\n
        assert got["tokens"] == answers


def test_a_model_is_faithful_to_itself(tiny_model, tiny_tokenizer):
    model = tiny_model()
    for responses_only in (False, True):
        r = fidelity_report(model, model, tiny_tokenizer, CONVERSATIONS, responses_only=responses_only, progress=False)
        assert r["kl_teacher_student"] == pytest.approx(0, abs=1e-7)
        assert r["kl_student_teacher"] == pytest.approx(0, abs=1e-7)
        assert r["top1_agreement"] == 1.0
