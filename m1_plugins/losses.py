"""Token-level distillation losses (M1 stage 1: reverse KL), bounded in memory.

KL is computed per token over the full vocabulary, in fp32, and summed over unmasked tokens; the sum is
divided by `normalizer` (default: the number of unmasked tokens here). Pass the token count of the whole
accumulated / data-parallel batch as `normalizer` (the HF Trainer's `num_items_in_batch`) to make the
mean global: then micro-batches add up to exactly the loss of the concatenated batch.

Memory: with `chunk_size`, tokens are processed in chunks (with an analytic, chunked backward), so fp32
full-vocabulary tensors exist for one chunk at a time, in the forward and in the backward pass.
`kl_divergence_from_hidden` also fuses the LM heads, so no full-row logits exist at all.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIRECTIONS = ("reverse", "forward")


def _kl_sum(student_logits, teacher_logits, direction: str, temperature: float, weights=None) -> torch.Tensor:
    """Sum over tokens (weighted by `weights`, (tokens,), if given) of KL between softmax(logits / T).
    Shape: (tokens, vocab) each -> scalar."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 (fp64 stays fp64, for gradcheck)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if direction == "reverse":  # KL(student || teacher): mode-seeking, the paper's choice
        per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    else:  # forward: KL(teacher || student)
        per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return per_token.sum() if weights is None else (per_token * weights).sum()


def _check(direction, temperature):
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _select(mask, *tensors):
    """Flatten leading dims and keep only the unmasked tokens (masked tokens cost nothing)."""
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    if mask is None:
        return flat
    keep = mask.reshape(-1).nonzero().squeeze(-1)
    return [t.index_select(0, keep) for t in flat]


def _normalise(total, n_tokens, normalizer):
    denominator = normalizer if normalizer is not None else n_tokens
    return total / max(float(denominator), 1.0)


def _row_dot(a, b):
    """Row-wise dot product (tokens, vocab) x2 -> (tokens, 1), without a product tensor."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2)


def _chunk_kl_inplace(student, teacher, direction: str, temperature: float, gradient: bool = False) -> torch.Tensor:
    """No autograd, in place, so about four chunk-sized fp32 tensors exist at the peak (measured on an H100; the
    autograd expression of `_kl_sum` keeps about seven): per-token KL (tokens, 1), or with `gradient` its
    derivative with respect to the student logits / T (tokens, vocab)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p_s = F.log_softmax(student.to(dtype, copy=True).div_(temperature), dim=-1)
    log_p_t = F.log_softmax(teacher.to(dtype, copy=True).div_(temperature), dim=-1)
    if direction == "reverse":  # KL = <p_s, log p_s - log p_t>; gradient p_s * (diff - KL)
        diff = log_p_t.neg_().add_(log_p_s)
        p_s = log_p_s.exp_()
        kl = _row_dot(p_s, diff)
        return diff.sub_(kl).mul_(p_s) if gradient else kl
    if gradient:  # KL = <p_t, log p_t - log p_s>; gradient p_s - p_t
        return log_p_s.exp_().sub_(log_p_t.exp_())
    diff = log_p_s.neg_().add_(log_p_t)
    return _row_dot(log_p_t.exp_(), diff)


class _ChunkedKL(torch.autograd.Function):
    """Sum of per-token KL over token chunks, with an analytic backward written chunk by chunk into one gradient
    buffer: besides that buffer only one chunk's fp32 tensors exist at a time (autograd through slices would
    allocate a full-size gradient per chunk). With `overwrite`, the buffer is the student logits themselves (each
    chunk is read before its gradient replaces it): the loss then adds no logits-sized tensor at all."""

    @staticmethod
    def forward(ctx, student, teacher, weights, direction, temperature, chunk_size, overwrite):
        ctx.save_for_backward(student, teacher, weights)
        ctx.direction, ctx.temperature, ctx.chunk_size, ctx.overwrite = direction, temperature, chunk_size, overwrite
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            end = start + chunk_size
            kl = _chunk_kl_inplace(student[start:end], teacher[start:end], direction, temperature)
            total += (kl.squeeze(1) * weights[start:end]).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student, teacher, weights = ctx.saved_tensors
        grad = student if ctx.overwrite else torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            g = _chunk_kl_inplace(student[start:end], teacher[start:end], ctx.direction, ctx.temperature, gradient=True)
            g.mul_(weights[start:end, None].to(g.dtype) * (grad_total / ctx.temperature))
            grad[start:end] = g
        return grad, None, None, None, None, None, None


def kl_divergence(student_logits, teacher_logits, mask=None, direction="reverse", temperature=1.0,
                  chunk_size=None, normalizer=None, overwrite_logits=False) -> torch.Tensor:
    """Mean per-token KL between student and teacher next-token distributions.

    Shape: student_logits, teacher_logits (..., vocab) with the same leading shape; mask (...), nonzero where
    a token counts. The teacher side gets no gradient. No T^2 factor is applied (the paper uses T = 1).
    With `chunk_size`, the loss and its gradient are computed that many tokens at a time; with `overwrite_logits`
    too, the backward pass writes the gradient into `student_logits`' memory (they hold dL/dlogits afterwards, so
    backward can run only once; autograd raises if another op saved them). The trainer's choice: it saves a
    logits-sized buffer (2.1 GB for 8192 tokens x 128k vocabulary in bf16).
    """
    _check(direction, temperature)
    if overwrite_logits and chunk_size is None:
        raise ValueError("overwrite_logits needs chunk_size: only the chunked backward writes into the logits")
    # masked tokens are weighted by 0 rather than gathered out: a gather would copy the logits, and its
    # backward would allocate a full-size gradient
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    weights = torch.ones(student.shape[0], device=student.device) if mask is None else mask.reshape(-1).float()
    if chunk_size is None:
        total = _kl_sum(student, teacher, direction, temperature, weights)
    else:
        total = _ChunkedKL.apply(student, teacher, weights, direction, temperature, chunk_size, overwrite_logits)
    return _normalise(total, weights.sum(), normalizer)


def _fused_chunk(student_hidden, student_weight, teacher_hidden, teacher_weight, direction, temperature):
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    return _kl_sum(student_hidden @ student_weight.T, teacher_logits, direction, temperature)


def kl_divergence_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                              direction="reverse", temperature=1.0, chunk_size=1024, normalizer=None) -> torch.Tensor:
    """`kl_divergence` of `student_hidden @ student_weight.T` vs `teacher_hidden @ teacher_weight.T`, with the
    LM heads fused into the token chunks: neither model's logits are ever materialised for a whole row.

    Shape: *_hidden (..., hidden) with the same leading shape (hidden sizes may differ); *_weight (vocab, hidden).
    """
    _check(direction, temperature)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]} rows "
                         "in their LM heads. Distillation needs the teacher's tokenizer for the student.")
    student, teacher = _select(mask, student_hidden, teacher_hidden.detach())
    total = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    for start in range(0, student.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_fused_chunk, student[start:end], student_weight, teacher[start:end],
                                   teacher_weight.detach(), direction, temperature, use_reentrant=False)
    return _normalise(total, student.shape[0], normalizer)


def distillation_loss(student_logits, teacher_logits, labels, kl_weight=1.0, ce_weight=0.0, direction="reverse",
                      temperature=1.0, chunk_size=None, normalizer=None, overwrite_logits=False) -> torch.Tensor:
    """The M1 stage-1/2 objective on next-token predictions of the tokens that carry labels:
        kl_weight * sum KL(student, teacher) / normalizer + ce_weight * sum CE(labels) / normalizer

    Shape: *_logits (batch, seq, vocab) at every position; labels (batch, seq), -100 where no loss is taken
    (prompts, padding). `teacher_logits` may be None when kl_weight is 0. `normalizer` defaults to the number of
    labelled tokens here; pass the accumulated / data-parallel count for a global mean. `overwrite_logits`: see
    `kl_divergence` (needs `chunk_size`).
    """
    # position t predicts label t+1; the last position predicts nothing. A mask rather than logits[:, :-1], whose
    # reshape would copy the logits of a batch of several rows
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    mask = targets != -100
    normalizer = normalizer if normalizer is not None else mask.sum()
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if kl_weight > 0:
        loss = loss + kl_weight * kl_divergence(student_logits, teacher_logits, mask, direction, temperature,
                                                chunk_size, normalizer, overwrite_logits)
    if ce_weight > 0:  # the gather copies the rows, so an overwriting KL backward leaves this term's inputs intact
        predicted, gold = _select(mask, student_logits)[0], targets[mask]
        loss = loss + ce_weight * _normalise(F.cross_entropy(predicted.float(), gold, reduction="sum"), len(gold), normalizer)
    return loss
