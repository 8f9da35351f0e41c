"""The trainers of the M1 plugin: Axolotl's trainer with an in-process frozen teacher.

`M1DistillTrainer` (stage 1, and SFT with a teacher for fidelity logging) minimises
    loss = m1_kl_weight * KL(student, teacher) + m1_ce_weight * CE(labels)
over the tokens that carry labels (assistant turns), normalised by the token count of the whole
accumulated / data-parallel batch (`num_items_in_batch`), so the loss equals the one of the concatenated batch.

`M1AlignTrainer` (`m1_align: true`, before distillation) trains only the Mamba mixers, each to reproduce the
teacher's attention layer it replaced (m1_plugins.align), after fitting their norm scales on the first batch.

Both log the student's fidelity to the teacher on held-out conversations when `m1_fidelity_data` is set."""

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from .. import align
from ..losses import distillation_loss
from ..utils import check_same_tokenizer
from .fidelity_callback import FidelityCallback

LOG = get_logger("axolotl.integrations.m1")  # Axolotl shows its own namespace at INFO
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def load_teacher(path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """The frozen teacher. A Llama teacher is wrapped as an all-attention M1 model (the conversion with every
    layer kept, which reproduces it exactly) so that packed rows are split into documents exactly as for the
    student: a plain HF Llama attends across the documents of a packed row."""
    from transformers import AutoModelForCausalLM

    from ..convert import convert_to_hybrid
    from ..modeling import M1ForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not isinstance(teacher, M1ForCausalLM):
        teacher = convert_to_hybrid(teacher, list(range(teacher.config.num_hidden_layers)), share_weights=True, progress=False)
    return teacher.to(device).eval().requires_grad_(False)


def training_dtype(args, model) -> torch.dtype:
    """The dtype the run computes in: bf16 / fp16 when the config asks for them (the student's `dtype` may then
    still report float32, from a parameter Axolotl keeps in full precision), else the student's."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else model.dtype


class M1TeacherTrainer(AxolotlTrainer):
    """Loads the frozen teacher next to the student and, with m1_fidelity_data, logs held-out fidelity."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        check_same_tokenizer(a.m1_teacher, self.processing_class)
        dtype = getattr(torch, a.m1_teacher_dtype) if a.m1_teacher_dtype else training_dtype(a, self.model)
        self.teacher = load_teacher(a.m1_teacher, dtype, self.args.device)
        if self.teacher.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"teacher vocab_size {self.teacher.config.vocab_size} != student vocab_size "
                             f"{self.model.config.vocab_size}: distillation needs one vocabulary.")
        self.tokens_seen = 0  # real (non-padding) tokens trained on, for the fidelity curve's x axis
        self.pending_logs = {}  # metrics measured between two logging steps, logged with the next training loss
        if a.m1_fidelity_data:
            self.add_callback(FidelityCallback(self, a.m1_fidelity_data, a.m1_fidelity_every, a.m1_fidelity_max_length))

    def count_tokens(self, inputs) -> None:
        mask = inputs.get("attention_mask")
        self.tokens_seen += int((mask != 0).sum()) if mask is not None else inputs["input_ids"].numel()

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.pending_logs:
            logs, self.pending_logs = {**logs, **self.pending_logs}, {}
        super().log(logs, *args, **kwargs)


class M1AlignTrainer(M1TeacherTrainer):
    loss_is_scaled_for_ga = False  # a per-micro-batch mean: the trainer averages it over the accumulated batch
    reports_token_perplexity = False  # Axolotl logs exp(loss) as `ppl`: exp of a mixer's output error means nothing

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        align.check_alignable(self.teacher.config, self.model.config)
        self.layers = align.mamba_layers(self.model.config)
        self.norms_fitted = False  # once, before the first update (a resumed run keeps its trained norms)
        for name, param in self.model.named_parameters():
            param.requires_grad_(".mamba." in name)  # the mixers only: the copied layers stay the teacher's
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        LOG.info("m1 alignment: teacher %s, %d mixers (layers %s) trained to reproduce its attention layers, %.1fM of "
                 "%.1fM parameters", self.args.m1_teacher, len(self.layers), self.layers, trained / 1e6,
                 self.model.num_parameters() / 1e6)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        fit_norms = self.state.global_step == 0 and not self.norms_fitted
        captured = align.capture_teacher(self.teacher, model_inputs, self.layers, keep_pre_o=fit_norms)
        student = self.accelerator.unwrap_model(model)
        if fit_norms:
            means = align.fit_norm_scales(student, captured)
            self.norms_fitted = True
            LOG.info("m1 alignment: gated-norm scales fitted to the teacher (mean weight per layer %s)",
                     {i: round(m, 3) for i, m in means.items()})
        self.count_tokens(model_inputs)
        loss, per_layer = align.alignment_loss(student, captured)
        self.pending_logs.update({"align/worst_layer_nmse": max(per_layer.values()),
                                  "align/best_layer_nmse": min(per_layer.values())})
        return (loss, None) if return_outputs else loss


class M1DistillTrainer(M1TeacherTrainer):
    loss_is_scaled_for_ga = True  # the loss is already normalised over the whole accumulated batch

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        LOG.info("m1 distillation: teacher %s (%s), %s KL x %.3g + CE x %.3g, T=%.3g, loss chunks of %d tokens",
                 a.m1_teacher, self.teacher.dtype, a.m1_kl_direction, a.m1_kl_weight, a.m1_ce_weight,
                 a.m1_kl_temperature, a.m1_loss_chunk_size)

    @property
    def reports_token_perplexity(self) -> bool:
        """Whether Axolotl logs exp(loss) as `ppl`: only when the loss is the plain cross-entropy; exp of a KL
        (or of KL + CE) is no perplexity."""
        return self.args.m1_kl_weight == 0 and self.args.m1_ce_weight == 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        model_inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        self.count_tokens(model_inputs)
        outputs = model(**model_inputs)
        teacher_logits = None
        if a.m1_kl_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs).logits
        # the KL's backward writes dL/dlogits over the logits (not needed after it): no second logits-sized buffer
        loss = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], a.m1_kl_weight, a.m1_ce_weight,
                                 a.m1_kl_direction, a.m1_kl_temperature, a.m1_loss_chunk_size, num_items_in_batch,
                                 overwrite_logits=not return_outputs)
        if a.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP/FSDP average gradients; the normaliser is global
        return (loss, outputs) if return_outputs else loss
