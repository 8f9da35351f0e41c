"""The distillation losses: exact against naive references, global normalisation, packing."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from m1_plugins.convert import convert_to_hybrid
from m1_plugins.losses import distillation_loss, kl_divergence, kl_divergence_from_hidden


def naive_kl(student, teacher, mask, direction):
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1) if direction == "reverse" else (log_t.exp() * (log_t - log_s)).sum(-1)
    return per_token[mask.bool()].mean()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
def test_kl_equals_naive_value_and_gradient(direction, chunk_size):
    torch.manual_seed(0)
    student = torch.randn(2, 7, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 7, 11, dtype=torch.float64)
    mask = torch.rand(2, 7) > 0.3
    got = kl_divergence(student, teacher, mask, direction, chunk_size=chunk_size)
    want = naive_kl(student, teacher, mask, direction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(want, student)[0], rtol=1e-10, atol=1e-12)


def test_kl_gradcheck_and_temperature():
    torch.manual_seed(1)
    student = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kl_divergence(s, teacher, chunk_size=2, temperature=2.0), (student,))
    hot = kl_divergence(student, teacher, temperature=2.0)
    torch.testing.assert_close(hot, naive_kl(student / 2, teacher / 2, torch.ones(5), "reverse"))
    assert kl_divergence(teacher, teacher).abs() < 1e-12


def test_fused_lm_head_equals_logits_path():
    torch.manual_seed(2)
    hs, ws = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True), torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64)
    mask = torch.rand(2, 9) > 0.4
    for direction in ("reverse", "forward"):
        fused = kl_divergence_from_hidden(hs, ws, ht, wt, mask, direction, chunk_size=4)
        plain = kl_divergence(hs @ ws.T, ht @ wt.T, mask, direction)
        torch.testing.assert_close(fused, plain)
        for a, b in zip(torch.autograd.grad(fused, (hs, ws)), torch.autograd.grad(plain, (hs, ws))):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_divergence_from_hidden(hs, ws, ht, torch.randn(12, 4, dtype=torch.float64))


def test_gradient_accumulation_equals_one_batch():
    """2 micro-batches x accumulation 2 with the global token count == one batch of 4 (value and gradient)."""
    torch.manual_seed(3)
    student = torch.randn(4, 8, 17, requires_grad=True)
    teacher = torch.randn(4, 8, 17)
    labels = torch.randint(0, 17, (4, 8))
    labels[:, :3] = -100
    labels[1, :6] = -100  # unequal token counts per micro-batch: a per-micro-batch mean would be wrong
    total = (labels[:, 1:] != -100).sum()
    whole = distillation_loss(student, teacher, labels, ce_weight=0.5, chunk_size=5)
    parts = sum(distillation_loss(student[i:i + 2], teacher[i:i + 2], labels[i:i + 2], ce_weight=0.5, chunk_size=5,
                                  normalizer=total) for i in (0, 2))
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(torch.autograd.grad(parts, student)[0], torch.autograd.grad(whole, student)[0])


def test_packed_distillation_equals_unpacked_documents():
    """A packed row (position_ids restart per document) gives the loss and gradients of the separate documents."""
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3)
    llama = LlamaForCausalLM(config).eval()
    teacher = convert_to_hybrid(llama, [0, 1, 2], progress=False)
    student = convert_to_hybrid(llama, [1], layout="head-aligned", progress=False)
    docs = [torch.randint(0, 64, (1, n)) for n in (9, 14, 5)]
    labels = [d.clone() for d in docs]
    for lab in labels:
        lab[:, :3] = -100  # the prompt
    total = sum((lab[:, 1:] != -100).sum() for lab in labels)
    ids, lab = torch.cat(docs, 1), torch.cat(labels, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    packed = distillation_loss(student(ids, position_ids=pos).logits, teacher(ids, position_ids=pos).logits, lab)
    packed_grads = torch.autograd.grad(packed, list(student.parameters()))
    separate = sum(distillation_loss(student(d).logits, teacher(d).logits, l, normalizer=total) for d, l in zip(docs, labels))
    separate_grads = torch.autograd.grad(separate, list(student.parameters()))
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="direction"):
        kl_divergence(x, x, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(x, x, temperature=0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_overwriting_backward_equals_naive_and_frees_the_buffer(direction):
    """`overwrite_logits`: the gradient lands in the logits' own memory, equal to the naive gradient."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 5, dtype=torch.float64)
    teacher = torch.randn(2, 7, 11, dtype=torch.float64)
    mask = torch.rand(2, 7) > 0.3
    logits = hidden @ head.T
    want_logits = logits.detach().clone()
    got = kl_divergence(logits, teacher, mask, direction, chunk_size=3, overwrite_logits=True)
    want = naive_kl(hidden @ head.T, teacher, mask, direction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_hidden, = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(want, hidden)[0], rtol=1e-10, atol=1e-12)
    # the logits now hold dL/dlogits: proof that no separate buffer was used
    logits_leaf = want_logits.requires_grad_()
    want_grad, = torch.autograd.grad(naive_kl(logits_leaf, teacher, mask, direction), logits_leaf)
    torch.testing.assert_close(logits.detach(), want_grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs chunk_size"):
        kl_divergence(logits, teacher, overwrite_logits=True)


def test_distillation_loss_with_overwrite_equals_without():
    """The trainer's setting (KL overwriting the logits, plus a CE term on the same logits) changes nothing."""
    torch.manual_seed(6)
    hidden = torch.randn(3, 6, 4, requires_grad=True)
    head = torch.randn(13, 4)
    teacher = torch.randn(3, 6, 13)
    labels = torch.randint(0, 13, (3, 6))
    labels[:, :2] = -100
    results = []
    for overwrite in (False, True):
        loss = distillation_loss(hidden @ head.T, teacher, labels, ce_weight=0.3, chunk_size=4, overwrite_logits=overwrite)
        results.append((loss, torch.autograd.grad(loss, hidden)[0]))
    torch.testing.assert_close(results[0], results[1])
