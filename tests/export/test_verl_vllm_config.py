"""verl_configs/grpo_m1_vllm.yaml (grpo_m1 with VeRL's vLLM rollout on an exported checkpoint): VeRL composes and
validates it, it differs from grpo_m1 only in its vLLM settings, which are VeRL settings, and its external_lib
makes VeRL's actor load the exported checkpoint with vLLM's grouped norm. vLLM itself is not run."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra")
pytest.importorskip("verl")

from hydra import compose, initialize_config_dir, initialize_config_module  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from m1_plugins import M1Config, M1ForCausalLM  # noqa: E402
from m1_plugins.export import GroupedNormGraniteMoeHybridForCausalLM, export_to_granite  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "verl_configs"
CONFIG_NAME = "grpo_m1_vllm"
REQUIRED = ["actor_rollout_ref.model.path=runs/m1-granite", "data.train_files=train.parquet", "data.val_files=val.parquet"]
# the settings marked "vLLM:" in the file
VLLM_SETTINGS = ["actor_rollout_ref.model.external_lib", "actor_rollout_ref.model.use_remove_padding",
                 "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.enable_prefix_caching",
                 "actor_rollout_ref.rollout.engine_kwargs.vllm", "trainer.experiment_name"]


def compose_ours(overrides=REQUIRED, name=CONFIG_NAME) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_composes_and_passes_verl_validation():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    config = compose_ours()
    assert config.actor_rollout_ref.rollout.name == "vllm" and config.actor_rollout_ref.model.use_remove_padding is False
    assert config.algorithm.adv_estimator == "grpo" and config.data.max_response_length == 32768  # grpo_m1's recipe
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert rollout.engine_kwargs["vllm"] == {"mamba_ssm_cache_dtype": "float32"} and rollout.n == 8


def test_differs_from_grpo_m1_only_in_the_vllm_settings():
    ours, recipe = (OmegaConf.to_container(compose_ours(name=name)) for name in (CONFIG_NAME, "grpo_m1"))
    for key in VLLM_SETTINGS:
        *parents, setting = key.split(".")
        for config in (ours, recipe):
            for parent in parents:
                config = config[parent]
            config.pop(setting)
    assert ours == recipe


def test_vllm_settings_are_verl_settings():  # Hydra would silently add a mistyped key
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        base = compose(config_name="ppo_trainer")
    for key in VLLM_SETTINGS:
        parent, _, name = key.rpartition(".")
        assert name in OmegaConf.select(base, parent).keys(), f"{key} is not a VeRL setting"  # ("???" is not "in")


def test_external_lib_gives_the_actor_the_grouped_norm(tmp_path, smollm2_dir, monkeypatch):
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.model import get_hf_auto_model_class

    torch.manual_seed(0)
    M1ForCausalLM(M1Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, attn_layers=[1], mamba_d_state=16,
                           mamba_head_dim=16)).save_pretrained(tmp_path / "m1")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path / "m1")
    export_to_granite(tmp_path / "m1", tmp_path / "granite")
    # the registration is process-wide: let the import run here, and undo it afterwards
    mapping = AutoModelForCausalLM._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    monkeypatch.delitem(sys.modules, "m1_plugins.granite_grouped_norm", raising=False)
    config = compose_ours([f"actor_rollout_ref.model.path={tmp_path / 'granite'}"] + REQUIRED[1:])
    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)  # imports external_lib, as VeRL's workers do
    auto_class = get_hf_auto_model_class(model_config.hf_config)
    assert isinstance(auto_class.from_pretrained(tmp_path / "granite"), GroupedNormGraniteMoeHybridForCausalLM)
