"""`plugins: [m1_plugins.axolotl.M1Plugin]`: M1 hybrids in Axolotl (distillation and SFT)."""

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from .args import M1_TRAINING_KEYS, check_known_keys

LOG = get_logger("axolotl.integrations.m1")  # Axolotl shows its own namespace at INFO


class M1Plugin(BasePlugin):
    """Registers the `m1_hybrid` model type (Auto classes and Axolotl's multipack, so packed rows reach the
    model with per-document position_ids), adds the `m1_*` config keys, converts `m1_convert_from` into
    `base_model` when asked, and supplies the alignment trainer (`m1_align`) or the distillation trainer (with a
    teacher: `m1_kl_weight > 0` or held-out fidelity logging)."""

    def register(self, cfg):
        check_known_keys(cfg)  # first: a typo'd key must not be trained past
        import m1_plugins
        from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

        m1_plugins.register()
        if m1_plugins.M1Config.model_type not in SUPPORTED_MULTIPACK_MODEL_TYPES:
            SUPPORTED_MULTIPACK_MODEL_TYPES.append(m1_plugins.M1Config.model_type)
        if cfg.get("m1_convert_from"):
            from .convert_on_load import convert_on_load

            convert_on_load(cfg, LOG)
        if cfg.get("m1_align"):  # before Axolotl loads anything: a pair that cannot be aligned fails in one line
            from transformers import AutoConfig

            from ..align import check_alignable

            teacher = cfg.get("m1_teacher") or cfg.get("m1_convert_from")
            check_alignable(AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(cfg["base_model"]))

    def get_input_args(self):
        return "m1_plugins.axolotl.args.M1Args"

    def get_training_args_mixin(self):
        return "m1_plugins.axolotl.args.M1TrainingArgsMixin"

    def get_training_args(self, cfg):
        return {key: cfg[key] for key in M1_TRAINING_KEYS if cfg.get(key) is not None}

    def get_trainer_cls(self, cfg):
        if cfg.get("m1_align"):
            from .trainer import M1AlignTrainer

            return M1AlignTrainer
        if (cfg.get("m1_kl_weight") if cfg.get("m1_kl_weight") is not None else 1.0) > 0 or cfg.get("m1_fidelity_data"):
            from .trainer import M1DistillTrainer

            return M1DistillTrainer
        LOG.info("m1_kl_weight is 0: plain SFT, no teacher is loaded")
        return None
