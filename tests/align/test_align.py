"""Attention alignment (m1_plugins.align) on tiny models: the teacher's captures, packed rows, the norm fit, dtypes."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from m1_plugins import align
from m1_plugins.convert import convert_to_hybrid


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, max_position_embeddings=128)
    llama = LlamaForCausalLM(config).eval()
    teacher = convert_to_hybrid(llama, [0, 1, 2], progress=False)  # all attention: what the trainers hook
    student = convert_to_hybrid(llama, [1], layout="head-aligned", progress=False)
    return teacher, student


def test_packed_rows_align_exactly_like_separate_rows():
    """A packed row (position_ids restart per document) gives the same per-layer errors as the two documents as a
    padded batch: the mixers get the teacher's document boundaries."""
    teacher, student = tiny_pair()
    a, b = torch.randint(0, 64, (1, 11)), torch.randint(0, 64, (1, 7))
    packed = {"input_ids": torch.cat([a, b], 1), "position_ids": torch.cat([torch.arange(11), torch.arange(7)])[None]}
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)]),
              "attention_mask": torch.tensor([[1] * 11, [1] * 7 + [0] * 4])}
    layers = align.mamba_layers(student.config)
    assert layers == [0, 2]
    _, per_layer_packed = align.alignment_loss(student, align.capture_teacher(teacher, packed, layers))
    _, per_layer_padded = align.alignment_loss(student, align.capture_teacher(teacher, padded, layers))
    for i in layers:
        assert abs(per_layer_packed[i] - per_layer_padded[i]) < 1e-5 * per_layer_padded[i]


def test_norm_fit_solves_least_squares_and_lowers_the_error():
    """After fit_norm_scales the mixer's activations before out_proj are the per-channel least-squares fit of the
    teacher's before o_proj (the residual is orthogonal to the normalised output), and the alignment error falls."""
    teacher, student = tiny_pair()
    batch = {"input_ids": torch.randint(0, 64, (2, 24))}
    layers = align.mamba_layers(student.config)
    captured = align.capture_teacher(teacher, batch, layers, keep_pre_o=True)
    before, _ = align.alignment_loss(student, captured)
    align.fit_norm_scales(student, captured)
    after, _ = align.alignment_loss(student, captured)
    assert after < before
    for i in layers:
        mixer = student.model.layers[i].mamba
        seen = {}
        handle = mixer.out_proj.register_forward_pre_hook(lambda m, args: seen.update(out=args[0]))
        align._mixer_forward(mixer, captured[i])
        handle.remove()
        fitted, target = seen["out"].flatten(0, 1), captured[i]["pre_o"].flatten(0, 1)
        normalised = fitted / mixer.norm.weight
        residual = ((fitted - target) * normalised).sum(0)
        assert residual.abs().max() < 1e-4 * (normalised * target).abs().sum(0).max()


def test_bf16_student_with_an_fp32_teacher():
    """The mixers run outside the student's forward (no trainer autocast reaches them): a bf16 student aligns to an
    fp32 teacher's captures, and only its mixers get gradients."""
    teacher, student = tiny_pair()
    student = student.to(torch.bfloat16).train()
    captured = align.capture_teacher(teacher, {"input_ids": torch.randint(0, 64, (2, 16))}, align.mamba_layers(student.config))
    loss, per_layer = align.alignment_loss(student, captured)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and set(per_layer) == {0, 2}
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    assert with_grad and all(".mamba." in n for n in with_grad)
