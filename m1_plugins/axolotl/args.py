"""Config keys of the M1 Axolotl plugin (`m1_*`), validated when Axolotl validates the YAML."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class M1Args(BaseModel):
    """Attention alignment (`m1_align: true`), distillation (stage 1) and SFT (stage 2) of M1 hybrids. With
    `m1_kl_weight: 0` the teacher is not loaded at all and training is plain cross-entropy SFT on the hybrid."""

    m1_align: bool = Field(
        default=False, description="Train only the Mamba mixers to reproduce the teacher's attention layers they "
                                   "replaced (per-layer alignment, before distillation); m1_kl/ce_weight do not apply.")
    m1_teacher: str | None = Field(default=None, description="Teacher checkpoint directory (shares the student's tokenizer).")
    m1_kl_weight: float = Field(default=1.0, ge=0.0, description="Weight of the KL(student, teacher) term.")
    m1_ce_weight: float = Field(default=0.0, ge=0.0, description="Weight of the cross-entropy term on the labels.")
    m1_kl_direction: Literal["reverse", "forward"] = Field(
        default="reverse", description="reverse = KL(student || teacher), the paper's mode-seeking choice.")
    m1_kl_temperature: float = Field(default=1.0, gt=0.0, description="Softmax temperature of both models in the KL.")
    m1_loss_chunk_size: int = Field(default=512, gt=0, description="Tokens per chunk of the KL: bounds its fp32 memory.")
    m1_teacher_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="dtype of the frozen teacher; default: the run's (bf16/fp16 when set, else the student's).")
    m1_convert_from: str | None = Field(
        default=None, description="A Transformer checkpoint to convert into `base_model` at start-up (once; reused "
                                  "while the conversion settings are unchanged). Also the default m1_teacher.")
    m1_attn_layers: list[int] | None = Field(default=None, description="m1_convert_from: attention layers to keep.")
    m1_num_attn_layers: int | None = Field(
        default=None, gt=0, description="m1_convert_from: instead of m1_attn_layers, keep N evenly spaced ones.")
    m1_layout: Literal["m1", "head-aligned"] = Field(default="m1", description="m1_convert_from: the mixer layout.")
    m1_xb_expansion: Literal["repeat", "learned"] = Field(
        default="repeat", description="m1_convert_from: GQA expansion of x and B.")
    m1_gate: Literal["open", "random"] = Field(default="open", description="m1_convert_from: the z gate's initialisation.")
    m1_fidelity_data: str | None = Field(
        default=None, description="JSONL of held-out conversations ({\"messages\": [...]}, e.g. the teacher's own answers "
                                  "from `m1 data --teacher`): the student's fidelity to the teacher on their last turns is "
                                  "logged every m1_fidelity_every steps and written to output_dir/m1_fidelity.jsonl.")
    m1_fidelity_every: int = Field(default=20, gt=0, description="Steps between two fidelity measurements.")
    m1_fidelity_max_length: int = Field(default=1024, gt=0, description="Tokens per fidelity conversation (cut).")

    @model_validator(mode="after")
    def check_m1_keys(self):
        if self.m1_kl_weight == 0 and self.m1_ce_weight == 0:
            raise ValueError("m1_kl_weight and m1_ce_weight are both 0: nothing to train. Set m1_kl_weight: 1.0 "
                             "(distillation) or m1_ce_weight: 1.0 (SFT).")
        if self.m1_convert_from:
            if not (Path(self.m1_convert_from) / "config.json").is_file():
                raise ValueError(f"m1_convert_from: {self.m1_convert_from!r} is not a checkpoint directory (no config.json).")
            if (self.m1_attn_layers is None) == (self.m1_num_attn_layers is None):
                raise ValueError("m1_convert_from needs exactly one of m1_attn_layers (e.g. [3, 8, 13, 18, 23, 27]) "
                                 "or m1_num_attn_layers (e.g. 6).")
            self.m1_teacher = self.m1_teacher or self.m1_convert_from
        if self.m1_fidelity_data:
            check_conversations_file(self.m1_fidelity_data, "m1_fidelity_data")
        if self.m1_align or self.m1_kl_weight > 0 or self.m1_fidelity_data:
            if not self.m1_teacher:
                why = "m1_align" if self.m1_align else "m1_fidelity_data" if self.m1_kl_weight == 0 else "m1_kl_weight > 0"
                raise ValueError(f"{why} needs m1_teacher: the teacher checkpoint directory "
                                 "(or set m1_kl_weight: 0 for SFT without a teacher).")
            if not (Path(self.m1_teacher) / "config.json").is_file():
                raise ValueError(f"m1_teacher: {self.m1_teacher!r} is not a checkpoint directory (no config.json there). "
                                 "Write one with `m1 teacher --out DIR` or point to a local HF checkpoint.")
        return self


def check_known_keys(cfg) -> None:
    """Refuse an unknown `m1_*` key, naming the closest valid one: Axolotl keeps unknown keys without a word, so a
    typo (`m1_kl_wieght`) would otherwise train with the default."""
    import difflib

    valid = list(M1Args.model_fields)
    for key in cfg:
        if key.startswith("m1_") and key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}."
            raise ValueError(f"unknown M1 plugin key {key!r}: {hint}")


def check_conversations_file(path: str, key: str) -> None:
    """A JSONL file whose first line is an object with a "messages" list: refused in one line otherwise."""
    import json

    if not Path(path).is_file():
        raise ValueError(f"{key}: {path!r} does not exist. Write one with `m1 data --teacher DIR --out {path}`.")
    with open(path) as f:
        first = f.readline()
    try:
        ok = isinstance(json.loads(first).get("messages"), list)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f'{key}: {path} line 1 is not a JSON object with a "messages" list (as `m1 data` writes).')


@dataclass
class M1TrainingArgsMixin:
    """The m1_* settings as carried by Axolotl's training arguments into the trainer."""

    m1_teacher: str | None = None
    m1_kl_weight: float = 1.0
    m1_ce_weight: float = 0.0
    m1_kl_direction: str = "reverse"
    m1_kl_temperature: float = 1.0
    m1_loss_chunk_size: int = 512
    m1_teacher_dtype: str | None = None
    m1_align: bool = False
    m1_fidelity_data: str | None = None
    m1_fidelity_every: int = 20
    m1_fidelity_max_length: int = 1024


M1_TRAINING_KEYS = tuple(M1TrainingArgsMixin.__dataclass_fields__)
