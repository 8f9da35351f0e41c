"""Attention alignment: each Mamba mixer of a converted hybrid learns to reproduce the attention layer it replaced.

The teacher runs on a batch; for every layer that the conversion turned into a mixer, hooks capture the teacher's
input to that attention layer (after the layer's input norm), the attention's output, and its activations before
`o_proj`. The student's mixer is fed the teacher's input (teacher forcing: the layers train independently and the
error of one does not reach the next) and regresses the teacher's output. This is LoLCATs' attention transfer and
MOHAWK's stage 2 (hidden-state alignment), applied per layer to the MambaInLlama initialisation; afterwards the
whole model is distilled with KL on its logits.

Loss: the normalised squared error sum ||mixer(x) - attn(x)||^2 / sum ||attn(x)||^2 over the real tokens of the
batch (document boundaries of packed rows kept: the mixer gets the teacher's `seq_idx`), averaged over layers, so
that every layer counts the same whatever the scale of its attention output.

`fit_norm_scales` calibrates the mixers' gated-norm weights before training: the norm sets every group of channels
to RMS 1, while the attention's activations before `o_proj` have RMS ~0.03-0.2, so a converted mixer's output is
several times too large. The per-channel least-squares scale to the teacher's activations removes that at once.
"""

import contextlib

import torch

from .modeling.modeling_m1 import M1Mamba2Mixer
from .ops.norm import rmsnorm_gated_ref


def mamba_layers(config) -> list[int]:
    """Indices of the layers that are Mamba mixers (the attention layers the conversion replaced)."""
    return [i for i, kind in enumerate(config.layers_block_type) if kind == "mamba"]


def check_alignable(teacher_config, student_config) -> None:
    """One-line errors for a teacher/student pair that alignment cannot work on, before any heavy work."""
    if getattr(student_config, "model_type", None) != "m1_hybrid":
        raise ValueError(f"attention alignment needs a converted M1 hybrid as base_model (model_type m1_hybrid), got "
                         f"model_type {getattr(student_config, 'model_type', None)!r}: convert it with `m1 convert`.")
    layers = mamba_layers(student_config)
    if not layers:
        raise ValueError("the student has no Mamba layers (every layer is attention): nothing to align. Convert with "
                         "fewer --attn-layers.")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(teacher_config, key) != getattr(student_config, key):
            raise ValueError(f"teacher and student differ in {key} ({getattr(teacher_config, key)} vs "
                             f"{getattr(student_config, key)}): m1_teacher must be the Transformer the student was "
                             "converted from.")
    teacher_kinds = getattr(teacher_config, "layers_block_type", None)
    if teacher_kinds and any(teacher_kinds[i] != "attention" for i in layers):
        raise ValueError("the teacher has Mamba layers where the student replaced attention: m1_teacher must be the "
                         "Transformer the student was converted from.")


class TeacherCapture(contextlib.AbstractContextManager):
    """Hooks on the teacher's layers `layers` (an all-attention M1 model, as the trainers load it). After a teacher
    forward, `captured[i]` holds layer i's attention input `x`, output `y`, activations before o_proj `pre_o`, and
    the layer's document layout (`seq_idx`, `token_mask`) as the model computed it."""

    def __init__(self, teacher, layers: list[int], keep_pre_o: bool = False):
        self.captured: dict[int, dict] = {}
        self.handles = []
        for i in layers:
            layer = teacher.model.layers[i]
            self.handles.append(layer.register_forward_pre_hook(self._layout_hook(i), with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_hook(self._attention_hook(i)))
            if keep_pre_o:
                self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._pre_o_hook(i)))

    def _layout_hook(self, i):
        def hook(module, args, kwargs):
            self.captured[i] = {"seq_idx": kwargs.get("seq_idx"), "token_mask": kwargs.get("token_mask")}
        return hook

    def _attention_hook(self, i):
        def hook(module, args, output):
            self.captured[i].update(x=args[0], y=output[0])
        return hook

    def _pre_o_hook(self, i):
        def hook(module, args):
            self.captured[i]["pre_o"] = args[0]
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def capture_teacher(teacher, inputs: dict, layers: list[int], keep_pre_o: bool = False) -> dict[int, dict]:
    """Run the teacher's decoder on `inputs` (input_ids, attention_mask, position_ids) and return what
    `TeacherCapture` saw for `layers`. The teacher's logits are never computed."""
    with TeacherCapture(teacher, layers, keep_pre_o) as hooks:
        teacher.model(**inputs, use_cache=False)
    return hooks.captured


def _real_tokens(layer: dict, like: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) float weights: 1 at real tokens, 0 at padding."""
    mask = layer["token_mask"]
    return torch.ones(like.shape[:2], device=like.device) if mask is None else mask.float()


def _mixer_forward(mixer: M1Mamba2Mixer, layer: dict) -> torch.Tensor:
    """The mixer on the teacher's input, cast to the mixer's dtype: the mixers are called outside the student's
    forward, so no autocast of the trainer reaches them, and the teacher may run in another dtype."""
    return mixer(layer["x"].to(mixer.in_proj.weight.dtype), seq_idx=layer["seq_idx"], token_mask=layer["token_mask"])


def alignment_loss(student, captured: dict[int, dict]) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over layers of each mixer's normalised squared error on the teacher's attention output; also the
    per-layer values (floats, for logging)."""
    losses = {}
    for i, layer in captured.items():
        mixer: M1Mamba2Mixer = student.model.layers[i].mamba
        out = _mixer_forward(mixer, layer)
        weight = _real_tokens(layer, out)
        error = ((out.float() - layer["y"].float()).pow(2).sum(-1) * weight).sum()
        energy = (layer["y"].float().pow(2).sum(-1) * weight).sum().clamp_min(1e-12)
        losses[i] = error / energy
    loss = torch.stack(list(losses.values())).mean()
    return loss, {i: v.item() for i, v in losses.items()}


@torch.no_grad()
def fit_norm_scales(student, captured: dict[int, dict]) -> dict[int, float]:
    """Set each mixer's gated-norm weight to the per-channel least-squares fit of the teacher's activations before
    o_proj (captured with keep_pre_o): w_c = sum_t n_tc a_tc / sum_t n_tc^2, where n is the mixer's normalised
    output before the weight. out_proj was copied from o_proj, so this matches the attention's output scale.
    Returns each layer's mean fitted weight."""
    means = {}
    for i, layer in captured.items():
        mixer: M1Mamba2Mixer = student.model.layers[i].mamba
        seen = {}
        handle = mixer.norm.register_forward_hook(lambda m, args, out: seen.update(y=args[0], z=args[1]))
        try:
            _mixer_forward(mixer, layer)
        finally:
            handle.remove()
        ones = torch.ones_like(mixer.norm.weight, dtype=torch.float32)
        n = rmsnorm_gated_ref(seen["y"].float(), ones, z=seen["z"].float(), eps=mixer.norm.variance_epsilon,
                              group_size=mixer.norm.group_size)
        weight = _real_tokens(layer, n)[..., None]
        a = layer["pre_o"].float()
        fitted = (n * a * weight).sum((0, 1)) / (n.pow(2) * weight).sum((0, 1)).clamp_min(1e-12)
        mixer.norm.weight.copy_(fitted.to(mixer.norm.weight.dtype))
        means[i] = fitted.mean().item()
    return means
