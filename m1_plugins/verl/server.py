"""The driver side of the `m1` rollout: `M1Server`, the Ray actor that owns an M1 engine, and `M1Replica`, which
VeRL's LLMServerManager builds through `RolloutReplicaRegistry` ("m1") and which launches one server per GPU.

VeRL's agent loop sends every sample as one request, `generate(prompt_ids, sampling_params, request_id, ...)`,
from many coroutines at once; `AsyncM1Engine` batches them continuously. Each server sits on the GPU of its trainer
rank (hybrid mode: trainer and rollout share the GPU and take turns), and receives the trainer's weights from
`M1ServerAdapter` (m1_plugins/verl/rollout.py) in byte buckets (m1_plugins/verl/weights.py).
"""

import asyncio
import logging
from typing import Any

import ray
import torch

from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from ..rollout import AsyncM1Engine, M1Engine, SamplingParams
from .rollout import check_config, max_model_len, server_name
from .weights import TensorMeta, open_shared, unpack

logger = logging.getLogger(__name__)

# sampling_params keys the agent loop (and its tool / fully-async variants) sends, and their engine meaning
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "max_tokens", "max_new_tokens",
                 "stop_token_ids", "seed", "ignore_eos")
# rollout.engine_kwargs.m1 keys, passed to M1Engine
ENGINE_KWARGS = ("kv_cache_tokens", "block_size")
# rollout.engine_kwargs.m1 keys the server itself reads
SERVER_KWARGS = ("sync_probe_tokens",)
# the prompt of the sync probe: token ids valid in every vocabulary
PROBE_PROMPT = list(range(1, 9))


def engine_sampling(sampling_params: dict[str, Any], config: RolloutConfig, prompt_len: int, max_len: int) -> SamplingParams:
    """VeRL's per-request sampling dict as engine SamplingParams.

    VeRL conventions: top_k -1 is off (the engine's 0), temperature 0 is greedy, `logprobs` asks for the sampled
    tokens' log-probs. Without max_tokens / max_new_tokens a request may fill the response budget, and never
    more than the room left in max_model_len (as VeRL's vLLM server does).
    """
    unknown = sorted(set(sampling_params) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling_params {unknown} are not supported by the m1 rollout (supported: {list(SAMPLING_KEYS)}).")
    room = max_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens, leaving no room to generate within max_model_len {max_len}: "
                         "raise data.max_prompt_length / rollout.max_model_len or shorten the prompt.")
    get = sampling_params.get
    if get("repetition_penalty", 1.0) != 1.0:
        raise NotImplementedError(f"repetition_penalty={get('repetition_penalty')}: the m1 engine samples without one; "
                                  "set actor_rollout_ref.rollout.repetition_penalty=1.0.")
    logprobs = get("logprobs", False)
    if logprobs not in (None, False, True, 0):  # vLLM style: 0 = only the sampled token's
        raise ValueError(f"logprobs={logprobs!r}: the m1 engine returns the sampled token's log-prob only (True or 0).")
    max_tokens = get("max_tokens", get("max_new_tokens"))
    if max_tokens is None:
        max_tokens = min(config.response_length, config.prompt_length + config.response_length - prompt_len)
    top_k = get("top_k", config.top_k)
    return SamplingParams(
        temperature=float(get("temperature", config.temperature)), top_p=float(get("top_p", config.top_p)),
        top_k=0 if top_k is None or top_k < 0 else int(top_k), max_tokens=max(1, min(int(max_tokens), room)),
        stop_token_ids=tuple(get("stop_token_ids") or ()), seed=get("seed"),
        ignore_eos=bool(get("ignore_eos", config.ignore_eos)), logprobs=logprobs is not None and logprobs is not False)


class M1Server:
    """One M1 engine serving one replica (one GPU), as a Ray actor (`ray.remote(M1Server)` in M1Replica).

    Args:
        config: the rollout config. model_config: the model config (actor_rollout_ref.model).
        rollout_mode: VeRL's mode; only HYBRID (trainer and rollout share the GPU) is supported.
        replica_rank: the replica this server serves.
        cuda_visible_devices: the trainer worker's GPU ("" on CPU), which M1Replica also made the only GPU this
            actor's process sees (before CUDA starts, through the actor's environment).
    """

    def __init__(self, config, model_config, rollout_mode: RolloutMode, replica_rank: int, cuda_visible_devices: str):
        if rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(f"the m1 rollout runs in hybrid mode (the trainer's GPUs), not {rollout_mode.value}.")
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        check_config(self.config, self.model_config.hf_config, self.model_config.local_path)
        engine_kwargs = dict(self.config.engine_kwargs.get("m1") or {})
        unknown = sorted(set(engine_kwargs) - set(ENGINE_KWARGS) - set(SERVER_KWARGS))
        if unknown:
            raise ValueError(f"rollout.engine_kwargs.m1 has unknown keys {unknown}; supported: "
                             f"{list(ENGINE_KWARGS + SERVER_KWARGS)}.")
        self.probe_tokens = int(engine_kwargs.pop("sync_probe_tokens", 0))
        self.engine_kwargs = engine_kwargs
        self.replica_rank = replica_rank
        self.device = torch.device("cuda", 0) if cuda_visible_devices else torch.device("cpu")
        self.max_model_len = max_model_len(self.config, self.model_config.hf_config)
        self.global_steps = None
        self.engine: AsyncM1Engine | None = None
        self._awake = False
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def _load_model(self):
        from transformers import AutoModelForCausalLM  # m1_hybrid is registered: this module imports m1_plugins

        dtype = getattr(torch, self.config.dtype)
        hf_config = self.model_config.hf_config
        # VeRL's config asks for flash_attention_2; the engine swaps in its own attention, SDPA loads anywhere
        if self.config.load_format == "dummy":  # hybrid mode: the trainer's weights arrive before the first rollout
            with torch.device(self.device):
                return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        return AutoModelForCausalLM.from_pretrained(self.model_config.local_path, config=hf_config, dtype=dtype,
                                                    attn_implementation="sdpa").to(self.device)

    async def launch_server(self):
        """Load the model and start the engine (cache planned from the free memory, CUDA graphs unless enforce_eager)."""
        def build():
            model = self._load_model()
            eos = self.model_config.generation_config.eos_token_id if self.model_config.generation_config else None
            return M1Engine(model, max_num_seqs=self.config.max_num_seqs, max_model_len=self.max_model_len,
                            max_num_batched_tokens=self.config.max_num_batched_tokens,
                            gpu_memory_utilization=self.config.gpu_memory_utilization,
                            cuda_graphs=self.device.type == "cuda" and not self.config.enforce_eager,
                            eos_token_id=eos, **self.engine_kwargs)

        self.engine = AsyncM1Engine(await asyncio.to_thread(build))
        self._awake = True
        logger.info("m1 server %d ready on %s (max_model_len %d)", self.replica_rank, self.device, self.max_model_len)

    def get_server_address(self) -> tuple[str, int]:
        # no HTTP endpoint: VeRL's load balancer keys servers by "address:port", so the replica rank stands in as port
        return ray.util.get_node_ip_address().strip("[]"), self.replica_rank

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data=None, video_data=None, audio_data=None, mm_processor_kwargs=None,
                       priority: int = 0) -> TokenOutput:
        """Token-in, token-out generation of one sample (VeRL's LLMServerClient calls this)."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("the m1 rollout serves text-only models; this request carries multimodal data.")
        if not self._awake:  # a request would otherwise reach an engine without cache and stop its thread
            raise RuntimeError(f"m1 server {self.replica_rank} is asleep (its memory is lent to training); VeRL sends "
                               "requests only after wake_up.")
        prompt_ids = [int(t) for t in prompt_ids]
        sampling = engine_sampling(sampling_params, self.config, len(prompt_ids), self.max_model_len)
        self._in_flight += 1
        self._drained.clear()
        try:
            output = await self.engine.generate(prompt_ids, sampling, request_id)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._drained.set()
        if output.error:
            raise ValueError(f"m1 engine refused request {request_id}: {output.error}")
        sample = output.samples[0]
        return TokenOutput(token_ids=sample.token_ids, log_probs=sample.logprobs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    async def wait_for_requests_to_drain(self):
        await self._drained.wait()

    async def sleep(self):
        """Free the engine's cache (and graphs) so that training has the memory; weights stay in place."""
        if self.config.free_cache_engine:
            self._awake = False
            await self.wait_for_requests_to_drain()
            await asyncio.to_thread(self.engine.sleep)

    async def wake_up(self, tags: list[str] | None = None):
        """Allocate the cache again (re-planned from the memory free now) and capture the decode graphs."""
        await asyncio.to_thread(self.engine.wake_up)
        self._awake = True
        if self.probe_tokens:
            await self.sync_probe()

    async def sync_probe(self) -> tuple[float, list[int]]:
        """Fingerprint (float64 sum of every parameter) and greedy continuation of a fixed prompt, logged: after a
        weight sync every replica must print the same pair, and a different one than before the update."""
        params = list(self.engine.engine.model.parameters())
        with torch.no_grad():
            fingerprint = torch.stack([p.detach().double().sum() for p in params]).sum().item()
        greedy = SamplingParams(temperature=0, max_tokens=self.probe_tokens, ignore_eos=True, logprobs=False)
        output = await self.engine.generate(PROBE_PROMPT, greedy, f"m1-sync-probe-{self.global_steps}")
        tokens = output.samples[0].token_ids
        # WARNING: Ray forwards it to the driver's console at default log levels
        logger.warning("m1 sync probe: replica %d, weights of step %s, fingerprint %.10e, greedy %s",
                       self.replica_rank, self.global_steps, fingerprint, tokens)
        return fingerprint, tokens

    async def receive_weights(self, shared: tuple[str, object], metas: list[TensorMeta]):
        """Copy one bucket of trainer weights into the engine's parameters (see weights.py)."""
        def load():
            self.engine.load_weights(unpack(open_shared(shared), metas))
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the sender refills the bucket once this returns

        await asyncio.to_thread(load)

    async def set_global_steps(self, global_steps: int | None):
        """The trainer step of the current weights, reported with every output (extra_fields["global_steps"])."""
        self.global_steps = global_steps

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        raise NotImplementedError("the m1 server does not implement VeRL's abort-and-park gate yet (M1Engine.abort "
                                  "exists), which VeRL's asynchronous trainers and non-naive checkpoint engines need: "
                                  "use trainer.v1.trainer_mode=sync with "
                                  "actor_rollout_ref.rollout.checkpoint_engine.backend=naive.")

    async def start_profile(self, **kwargs):
        raise NotImplementedError("rollout profiling is not implemented for the m1 rollout; disable "
                                  "actor_rollout_ref.rollout.profiler.")

    stop_profile = start_profile


def _worker_placement(worker) -> tuple[str, str]:
    """(node id, visible GPU or "") of a trainer worker; runs inside the worker through Ray's __ray_call__."""
    from verl.utils.device import get_resource_name

    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get(get_resource_name(), []) if torch.cuda.is_available() else []
    return context.get_node_id(), ",".join(map(str, gpus))


class M1Replica(RolloutReplica):
    """A replica of the `m1` rollout: one M1Server on the GPU of one trainer rank (rollout world size 1)."""

    async def launch_servers(self):
        if self.rollout_mode != RolloutMode.HYBRID or len(self.workers) != 1:
            raise NotImplementedError(f"the m1 rollout runs in hybrid mode with one trainer rank per replica; got "
                                      f"{self.rollout_mode} with {len(self.workers)} workers.")
        if self.is_reward_model or self.is_teacher_model:
            raise NotImplementedError("the m1 rollout serves the policy only, not reward or teacher models.")
        node_id, gpus = await self.workers[0].__ray_call__.remote(_worker_placement)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_visible_devices_keyword

        # Ray gives a 0-GPU actor no GPU; with its NOSET flag the server sees exactly the trainer rank's GPU
        platform = get_platform()
        env_vars = {**{var: "1" for var in platform.ray_noset_envvars()}, **platform.rollout_env_vars()}
        if gpus:
            env_vars[get_visible_devices_keyword()] = gpus
        server = ray.remote(M1Server).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            runtime_env={"env_vars": env_vars}, name=server_name(self.replica_rank), max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode,
                 replica_rank=self.replica_rank, cuda_visible_devices=gpus)
        await server.launch_server.remote()
        address, port = await server.get_server_address.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{address}:{port}"
