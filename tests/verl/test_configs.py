"""verl_configs/: both recipes compose with VeRL's own ppo_trainer config (Hydra, and VeRL's CLI), carry the
paper's stage-3 choices, and pass VeRL's config validation and the m1 rollout's checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "verl_configs"


def compose(config_dir: Path, name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def validate_like_verl(cfg, m1_dir):
    """What VeRL checks before it starts Ray (main_ppo.main), plus the dataclass configs its workers build and the
    m1 rollout's own refusals."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import HFModelConfig

    from m1_plugins.verl.rollout import check_config

    assert not need_reference_policy(cfg) and not need_critic(cfg)  # no reference model, no critic
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    assert model.hf_config.model_type == "m1_hybrid" and model.hf_config._attn_implementation == "sdpa"
    check_config(rollout, model.hf_config, str(m1_dir))
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    # VeRL's dynamic batching asserts that the longest sample fits one micro-batch
    assert cfg.actor_rollout_ref.actor.use_dynamic_bsz and cfg.actor_rollout_ref.rollout.log_prob_use_dynamic_bsz
    assert cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu >= longest
    assert cfg.actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu >= longest
    assert (rollout.prompt_length, rollout.response_length) == (cfg.data.max_prompt_length, cfg.data.max_response_length)


def test_grpo_m1_is_the_papers_stage_3(m1_dir):
    cfg = compose(CONFIGS, "grpo_m1", [f"actor_rollout_ref.model.path={m1_dir}", "data.train_files=train.parquet",
                                       "data.val_files=val.parquet"])
    OmegaConf.resolve(cfg)
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.use_kl_in_reward is False
    assert actor.use_kl_loss is False and actor.entropy_coeff > 0
    assert (cfg.data.train_batch_size, actor.ppo_mini_batch_size, rollout.n) == (128, 64, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 32768)
    assert (actor.optim.optimizer, actor.optim.lr, actor.optim.weight_decay) == ("AdamW", 1e-6, 0.0)
    assert (cfg.trainer.total_training_steps, cfg.trainer.n_gpus_per_node) == (50, 8)
    assert cfg.trainer.test_freq == cfg.trainer.save_freq > 0 and cfg.trainer.max_actor_ckpt_to_keep is None
    assert (rollout.name, rollout.tensor_model_parallel_size, rollout.calculate_log_probs) == ("m1", 1, True)
    assert cfg.algorithm.rollout_correction.rollout_is == "token"
    assert cfg.actor_rollout_ref.model.external_lib == "m1_plugins.verl.register"
    assert cfg.reward.custom_reward_function == {"path": "pkg://m1_plugins.verl.reward", "name": "compute_score"}
    validate_like_verl(cfg, m1_dir)


def test_small_config_for_one_gpu(m1_dir):
    cfg = compose(CONFIGS / "small", "grpo_smollm2", [f"actor_rollout_ref.model.path={m1_dir}"])
    OmegaConf.resolve(cfg)
    assert (cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes, cfg.actor_rollout_ref.rollout.name) == (1, 1, "m1")
    assert cfg.actor_rollout_ref.rollout.max_num_seqs >= cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
    validate_like_verl(cfg, m1_dir)


def test_verl_cli_composes_it(m1_dir):
    """VeRL's own entry point with --cfg job: Hydra composes and prints the job config, main() does not run."""
    done = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIGS / "small"), "--config-name",
         "grpo_smollm2", f"actor_rollout_ref.model.path={m1_dir}", "actor_rollout_ref.rollout.n=4", "--cfg", "job"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = OmegaConf.create(done.stdout)
    assert (cfg.actor_rollout_ref.rollout.name, cfg.actor_rollout_ref.rollout.n) == ("m1", 4)
    assert cfg.actor_rollout_ref.model.path == str(m1_dir)
