"""The m1 rollout in real Ray on CPU, driven by VeRL's own driver code: LLMServerManager builds M1Replica through the
registry and launches its M1Server next to a trainer rank (hybrid mode), VeRL's LLMServerClient sends concurrent
requests through its load balancer, and CheckpointEngineManager runs the colocated loop (sleep, naive weight
sync from the trainer rank, wake up). The trainer rank is a stand-in for VeRL's ActorRolloutRefWorker: it builds
the rollout adapter exactly as that worker does and runs the steps of its naive `update_weights`."""

import asyncio
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("verl")
for _module in ("uvicorn", "fastapi", "cachetools"):  # VeRL's rollout driver imports them: its verl-core extra
    pytest.importorskip(_module, reason="VeRL's LLMServerManager needs `pip install verl[verl-core]`")

from verl.single_controller.base import Worker  # noqa: E402
from verl.single_controller.base.decorator import Dispatch, register  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "verl_configs"
PROMPTS = [[5, 6, 7], list(range(100, 120)), [42] * 9, [50, 2, 9, 11]]
GREEDY = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True, "ignore_eos": True}


def trainer_rank_class():
    """A trainer rank: the rollout adapter built as ActorRolloutRefWorker.init_model builds it, and a policy whose
    weights it syncs into the engine as ActorRolloutRefWorker.update_weights(mode="naive") does. Defined in a function
    so that Ray ships the class by value (its workers cannot import this test module)."""

    class TrainerRank(Worker):
        def __init__(self, config, policy_dir: str):
            super().__init__()
            self.config, self.policy_dir = config, policy_dir

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self):
            # imports inside: a by-value function that names torch.distributed drags torch's config modules along
            import torch
            from torch.distributed import init_process_group
            from torch.distributed.device_mesh import init_device_mesh
            from transformers import AutoModelForCausalLM
            from verl.utils.config import omega_conf_to_dataclass
            from verl.workers.config import HFModelConfig
            from verl.workers.rollout.base import get_rollout_class

            init_process_group(backend="gloo")
            mesh = init_device_mesh("cpu", mesh_shape=(1, 1, 1), mesh_dim_names=["dp", "infer_tp", "infer_pp"])
            rollout_config = omega_conf_to_dataclass(self.config.rollout)
            model_config = omega_conf_to_dataclass(self.config.model, dataclass_type=HFModelConfig)
            self.rollout = get_rollout_class(rollout_config.name, rollout_config.mode)(
                config=rollout_config, model_config=model_config, device_mesh=mesh)
            self.policy = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=torch.float32)

        @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
        async def update_weights(self, global_steps: int = None, mode: str = "auto"):
            await self.rollout.resume(tags=["weights"])
            await self.rollout.update_weights(((n, t) for n, t in self.policy.state_dict().items()), peft_config=None,
                                              base_sync_done=True, global_steps=global_steps)
            await self.rollout.resume(tags=["kv_cache"])

    return TrainerRank


@torch.no_grad()
def greedy(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


@pytest.fixture
def ray_cpu():
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_hybrid_loop_through_verl_driver(ray_cpu, m1_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig, AutoModelForCausalLM
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.rollout.llm_server import LLMServerManager

    torch.manual_seed(1)
    policy_dir = tmp_path / "policy"  # the "trained" policy: other weights, same architecture
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m1_dir)).save_pretrained(policy_dir)

    with initialize_config_dir(config_dir=str(CONFIGS / "small"), version_base=None):
        config = compose("grpo_smollm2", overrides=[
            f"actor_rollout_ref.model.path={m1_dir}", "data.max_prompt_length=32", "data.max_response_length=12",
            "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.max_num_seqs=8",
            "+actor_rollout_ref.rollout.engine_kwargs.m1.kv_cache_tokens=2048"])

    pool = RayResourcePool([1], use_gpu=False, max_colocate_count=1)
    trainer = RayWorkerGroup(pool, RayClassWithInitArgs(cls=ray.remote(trainer_rank_class()), config=config.actor_rollout_ref,
                                                         policy_dir=str(policy_dir)), device_name="cpu")
    trainer.init_model()
    servers = LLMServerManager.create(config=config, worker_group=trainer)
    replicas = servers.get_replicas()
    assert [type(r).__name__ for r in replicas] == ["M1Replica"]
    client = servers.get_client()

    def generate_all():
        async def run():
            return await asyncio.gather(*[client.generate(f"r{i}", prompt_ids=p, sampling_params=dict(GREEDY))
                                          for i, p in enumerate(PROMPTS)])

        return asyncio.run(run())

    # load_format dummy: the server starts from random weights, VeRL syncs the trainer's before the first rollout
    checkpoints = CheckpointEngineManager(
        config=omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine), actor_wg=trainer,
        replicas=replicas)
    checkpoints.sleep_replicas()
    checkpoints.update_weights(global_steps=1)
    outputs = generate_all()
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == greedy(policy_dir, prompt, 12) and len(out.log_probs) == 12
        assert (out.stop_reason, out.extra_fields["global_steps"]) == ("completed", 1)
    # the next step: the engine sleeps for training and wakes with the same weights (a real step would change them)
    checkpoints.sleep_replicas()
    checkpoints.update_weights(global_steps=2)
    again = generate_all()
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]
    assert {o.extra_fields["global_steps"] for o in again} == {2}
