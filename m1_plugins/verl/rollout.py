"""The worker side of the `m1` rollout: `M1ServerAdapter`, VeRL's `BaseRollout` in each trainer process.

VeRL's ActorRolloutRefWorker builds one per rank (`_ROLLOUT_REGISTRY[("m1", "async")]`). The engine itself runs
in that rank's `M1Server` actor on the same GPU (m1_plugins/verl/server.py); the adapter only drives it. In the
colocated ("hybrid") loop VeRL calls, per training step:

    replica.sleep()                 -> server.sleep(): the engine frees its cache for training
    rollout.resume(["weights"])     -> nothing: the engine's weights never leave the GPU
    rollout.update_weights(gen)     -> every tensor of the trainer's per-tensor generator (a collective: drained on
                                       every rank) is copied into the engine's fixed parameter buffers
    rollout.resume(["kv_cache"])    -> server.wake_up(): cache (and CUDA graphs) back for the next rollout
"""

import logging

import torch

from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout

from ..modeling import M1Config
from .weights import send_weights

logger = logging.getLogger(__name__)


def server_name(replica_rank: int) -> str:
    """Ray actor name of a replica's server: the adapter finds its server by it."""
    return f"m1_server_{replica_rank}"


def max_model_len(config: RolloutConfig, hf_config) -> int:
    """Longest sequence the engine must hold: rollout.max_model_len, else prompt_length + response_length."""
    length = config.max_model_len or config.prompt_length + config.response_length
    limit = hf_config.max_position_embeddings
    if length > limit:
        raise ValueError(f"the rollout needs sequences of {length} tokens (rollout.max_model_len, else prompt_length "
                         f"{config.prompt_length} + response_length {config.response_length}), more than the model's "
                         f"max_position_embeddings ({limit}): lower data.max_response_length / max_prompt_length.")
    return length


def check_config(config: RolloutConfig, hf_config, path: str) -> None:
    """Refuse what the `m1` rollout cannot run, naming the setting to change."""
    if hf_config.model_type != M1Config.model_type:
        raise ValueError(f"rollout.name=m1 runs M1 hybrids (model_type {M1Config.model_type!r}), but {path} is a "
                         f"{hf_config.model_type!r} checkpoint. Convert it first (`m1 convert --teacher {path} --out DIR`) "
                         "or choose another rollout.")
    parallel = (config.tensor_model_parallel_size, config.data_parallel_size, config.pipeline_model_parallel_size)
    if parallel != (1, 1, 1):
        raise NotImplementedError(
            f"the m1 engine runs one model per GPU; got tensor/data/pipeline parallel sizes {parallel}. Set "
            "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline_model_parallel_size=1).")
    max_model_len(config, hf_config)


class M1ServerAdapter(BaseRollout):
    """Drives the rank's M1Server: wake/sleep around training and the weight sync from the trainer.

    Args:
        config: the rollout config (actor_rollout_ref.rollout).
        model_config: the model config (actor_rollout_ref.model).
        device_mesh: VeRL's rollout mesh (dp, infer_tp, infer_pp); the replica is this rank's dp index. None in
            VeRL's colocated/standalone worker, which passes `replica_rank` instead.
        replica_rank: used when `device_mesh` is None.
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        check_config(self.config, self.model_config.hf_config, self.model_config.local_path)
        self.replica_rank = device_mesh["dp"].get_local_rank() if device_mesh is not None else replica_rank
        self.is_leader_rank = True  # one GPU per replica: every rank leads its own
        self._server = None

    def _server_handle(self):
        # looked up lazily: VeRL launches the servers after the workers have built their adapters
        if self._server is None:
            import ray

            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        if "kv_cache" in tags and self.config.free_cache_engine:
            await self._server_handle().wake_up.remote()

    async def release(self):
        if self.config.free_cache_engine:
            await self._server_handle().sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", peft_config=None,
                             global_steps: int | None = None, **kwargs):
        """Copy the trainer's weights into the engine (kwargs: VeRL's `base_sync_done`, not needed without LoRA)."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the m1 rollout takes full tensors; got wire_format={wire_format!r}. Use "
                                      "actor_rollout_ref.rollout.checkpoint_engine.backend=naive.")
        if peft_config is not None:
            raise NotImplementedError("the m1 engine has no LoRA adapters: set actor_rollout_ref.model.lora.merge=true "
                                      "so that the trainer sends merged weights.")
        server = self._server_handle()
        bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        count = await send_weights(weights, server.receive_weights.remote, bucket_bytes)
        await server.set_global_steps.remote(global_steps)
        logger.info("m1 rollout %d: %d tensors synced (step %s)", self.replica_rank, count, global_steps)
