"""M1Engine: batched generation with an `M1ForCausalLM` — the model class itself, no copy of its code.

Each `step()` either prefills newly admitted sequences (one packed varlen forward; n samples of a prompt share
it and get copies of its state) or decodes one token for every running sequence (one CUDA-graph replay per
batch-size bucket on GPU, an eager forward on CPU), then samples. Continuous batching: a finished sequence frees
its slot and KV blocks at once and a waiting one takes them at the next step. When the KV pool runs out, the
youngest running sequence is preempted and later resumed by prefilling its prompt plus what it generated.

The host works one step behind the GPU: a step's sampled tokens stay on the device, where they are the next
decode step's inputs, and the host reads them (stop tokens, callbacks, bookkeeping) only after it has queued the
next step, so that its Python work overlaps the GPU's instead of adding to it. The cost: a sequence that stops on
a stop token runs one more step, whose token is dropped (one that ends by length is known in advance and does not).

Memory is planned once: Mamba state slots for `max_num_seqs` sequences, then KV blocks from what is left of
`gpu_memory_utilization` after the weights, the slots and the measured peak of the largest prefill. Nothing is
allocated while generating, so a workload larger than memory waits instead of running out of memory.
"""

import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

from ..modeling.cache import state_bytes_per_token
from ..modeling.modeling_m1 import M1ForCausalLM
from .paged_attention import ATTN_IMPLEMENTATION, PagedDecode
from .sampling import SamplingParams, sample
from .state import PagedHybridState

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 64
CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on CPU when kv_cache_tokens is not given
GRAPH_RESERVE_BYTES = 1 << 29  # CUDA graphs' private pool and allocator slack


def kv_tokens_for(num_seqs: int, max_model_len: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """A KV pool (`kv_cache_tokens`) that runs `num_seqs` sequences of up to `max_model_len` tokens together."""
    return num_seqs * (math.ceil(max_model_len / block_size) + 1) * block_size


@dataclass
class Sample:
    token_ids: list[int]  # generated tokens, the stop token included when finish_reason is "stop"
    logprobs: list[float] | None  # log_softmax(logits / temperature)[token], see `sampling`
    finish_reason: str  # "stop" (EOS or a stop token), "length" (max_tokens or max_model_len) or "abort"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]
    error: str | None = None  # set when the request was refused; the other requests are unaffected


@dataclass
class EngineStats:
    graph_captures: int = 0
    prefill_forwards: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sequences decoded, summed over the decode steps
    decode_kv_tokens: int = 0  # context tokens each decoded sequence attends to (its new one included), summed
    preemptions: int = 0
    max_running: int = 0
    num_blocks: int = 0
    prefill_seconds: float = 0.0  # wall time of prefill / decode steps (each ends in a device sync: sampling)
    decode_seconds: float = 0.0


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    on_done: object
    on_token: object = None
    samples: list = field(default_factory=list)
    pending: int = 0


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int
    tokens: list[int]  # prompt + generated; the last one is not yet fed to the model
    generator: torch.Generator | None
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    order: int = 0  # admission order: the youngest is preempted first
    in_flight: int = 0  # tokens sampled on the device, not yet appended to `tokens`

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)


class M1Engine:
    def __init__(self, model: M1ForCausalLM, *, max_num_seqs: int = 256, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 8192, block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, cuda_graphs: bool | None = None, compile: bool | None = None,
                 eos_token_id=None):
        if not isinstance(model, M1ForCausalLM):
            raise TypeError(f"M1Engine runs an M1ForCausalLM, got {type(model).__name__}. Convert a Transformer first "
                            "(`m1 convert`), or load an M1 checkpoint with AutoModelForCausalLM.")
        self.device = model.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, but it is on {self.device}. "
                             "Move it to a GPU or pass cuda_graphs=False (the eager path).")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.model = model.eval()
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.config, self.dtype = model.config, model.dtype
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_tokens, self.gpu_memory_utilization, self.cuda_graphs = kv_cache_tokens, gpu_memory_utilization, cuda_graphs
        # torch.compile fuses the decode step's many small elementwise kernels (norms, gates, the conv update),
        # which at decode batch sizes cost as much as the weight reads; the graphs then replay the fused kernels
        self._decode_model = torch.compile(self.model, dynamic=True) if (cuda_graphs if compile is None else compile) else self.model
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple, set)) else [] if eos is None else [eos])
        self.stats = EngineStats()
        self.waiting: deque[list[_Sequence]] = deque()  # groups of sequences with the same tokens, prefilled once
        self._waiting_prompts: dict[tuple[int, ...], list[_Sequence]] = {}  # fresh waiting groups by prompt
        self.running: list[_Sequence] = []
        self._finished: dict[str, RequestOutput] = {}
        self._ids = itertools.count()
        self._order = itertools.count()
        self._pending = None  # the last step's sampled tokens, not yet read by the host: see `_apply_pending`
        self.state = None
        self.wake_up()

    # --- memory and graphs ---
    def wake_up(self):
        """Allocate the cache (and capture the decode graphs). Called by the constructor and after `sleep`."""
        if self.state is not None:
            return
        if self.device.type == "cuda" and next(self.model.parameters()).device.type != "cuda":
            self.model.to(self.device)
        S = self.max_num_seqs
        self._max_blocks = math.ceil(self.max_model_len / self.block_size)
        # ids (written by the sampler on the device), positions, KV slots, context lengths (graph inputs), then the
        # running sequences' slots (sampler rows); rows are indexed by slot
        self._step_inputs = torch.zeros(5, S, dtype=torch.long, device=self.device)
        self._slot_sampling = torch.zeros(3, S, device=self.device)  # temperature, top_k, top_p of each slot
        self._block_tables = torch.zeros(S, self._max_blocks, dtype=torch.long, device=self.device)
        self._table_writes: list[tuple[int, int, int]] = []  # (slot, index, block) not yet on the device
        self._slot_params: list[tuple[int, float, int, float]] = []  # sampling parameters of newly admitted slots
        num_blocks = self._plan_blocks()
        self.state = PagedHybridState(self.config, S, num_blocks, self.block_size, self.dtype, self.device)
        self.free_slots = list(range(S))
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # block 0: scratch for empty slots
        self.stats.num_blocks = num_blocks
        # from 2: torch.compile specialises a dimension of size 1, so a bucket of 1 would be a second compilation
        self._buckets = sorted({min(2 ** i, S) for i in range(1, S.bit_length() + 1)})
        self._graphs = {}
        if self.cuda_graphs:
            self._capture_graphs()
        logger.info("M1Engine: %d sequences, %d KV blocks of %d tokens (%d tokens), %d CUDA graphs", S, num_blocks - 1,
                    self.block_size, (num_blocks - 1) * self.block_size, len(self._graphs))

    def sleep(self, offload_weights: bool = False):
        """Free the cache and the graphs (e.g. while a trainer uses the GPU); `wake_up` restores them."""
        if self.has_unfinished():
            raise RuntimeError("sleep() with requests in flight: wait for them to finish (or abort them) first.")
        self.state, self._graphs = None, {}
        if offload_weights:
            self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _plan_blocks(self) -> int:
        per_block = state_bytes_per_token(self.config, self.dtype.itemsize)["kv_bytes_per_token"] * self.block_size
        per_seq = self._max_blocks
        if self.kv_cache_tokens is not None:
            blocks = math.ceil(self.kv_cache_tokens / self.block_size)
        elif self.device.type != "cuda":
            blocks = CPU_KV_CACHE_BYTES // max(per_block, 1)
        else:
            blocks = self._blocks_from_free_memory(per_block)
        if blocks < per_seq:
            raise MemoryError(
                f"the KV cache holds {blocks * self.block_size} tokens, less than one sequence of max_model_len="
                f"{self.max_model_len}: lower max_model_len or max_num_seqs, or raise gpu_memory_utilization / kv_cache_tokens.")
        return blocks + 1

    def _blocks_from_free_memory(self, per_block: int) -> int:
        """Profile the largest prefill (a full batch of prompts, or one preempted sequence of up to max_model_len
        tokens resuming) with the Mamba slots allocated; the KV pool gets what is left."""
        self.state = PagedHybridState(self.config, self.max_num_seqs, 1, self.block_size, self.dtype, self.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        n = max(self.max_num_batched_tokens, self.max_model_len)  # a preempted sequence resumes in one prefill
        self._forward_prefill(torch.zeros(n, dtype=torch.long, device=self.device),
                              torch.tensor([0, n], device=self.device), torch.zeros(1, dtype=torch.long, device=self.device),
                              torch.zeros(n, dtype=torch.long, device=self.device))
        activations = torch.cuda.max_memory_allocated() - base
        torch.cuda.empty_cache()  # free memory is measured with the slots still allocated
        free, total = torch.cuda.mem_get_info()
        sampler = 4 * self.max_num_seqs * self.config.vocab_size * 4  # fp32 logits, scaled, log-probs, probabilities
        budget = total * self.gpu_memory_utilization - (total - free) - activations - sampler - GRAPH_RESERVE_BYTES
        self.state = None
        return max(0, int(budget // per_block))

    def _capture_graphs(self):
        """One graph per batch bucket over the static inputs, captured while no sequence runs (the warm-up run writes
        only the scratch block and empty slots); largest first so that the smaller ones reuse its memory pool."""
        self._step_inputs.zero_()
        self._step_inputs[3] = 1
        pool = None
        for batch in reversed(self._buckets):
            self._decode_forward(batch)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_forward(batch)
            pool = graph.pool()
            self._graphs[batch] = (graph, logits)
            self.stats.graph_captures += 1

    # --- weights ---
    @torch.no_grad()
    def load_weights(self, named_tensors):
        """Copy new weights into the model's parameters in place (their addresses, hence the graphs, stay valid).
        Names are the HF names of M1ForCausalLM; tied aliases (lm_head.weight) are accepted."""
        params = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"load_weights: {name!r} is not a parameter of this M1ForCausalLM "
                               f"(e.g. {next(iter(params))!r}); send HF parameter names of the same architecture.")
            if params[name].shape != tensor.shape:
                raise ValueError(f"load_weights: {name} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(params[name].shape)}: the checkpoint is of another configuration.")
            params[name].data.copy_(tensor, non_blocking=True)

    # --- requests ---
    def add_request(self, prompt_ids, sampling: SamplingParams, request_id: str | None = None, on_done=None,
                    on_token=None) -> str:
        """Queue a request; `on_done(RequestOutput)` is called when it finishes (else `generate` collects it), and
        `on_token(sample_index, token, logprob, finish_reason or None)` after every token, if given (logprob is
        None unless a request in the batch asked for log-probs).
        A request that cannot run finishes at once with `error` set."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        request = _Request(request_id, list(prompt_ids), sampling, on_done, on_token)
        error = self._check(request)
        if error:
            self._deliver(RequestOutput(request_id, request.prompt, [], error=error), on_done)
            return request_id
        request.samples, request.pending = [None] * sampling.n, sampling.n
        group = []
        for i in range(sampling.n):
            generator = None
            if sampling.seed is not None and sampling.temperature > 0:
                generator = torch.Generator(self.device).manual_seed(sampling.seed + i)
            group.append(_Sequence(request, i, list(request.prompt), generator))
        # requests for a prompt that is already waiting join its group: one prefill for all (VeRL sends the n
        # samples of a GRPO prompt as n concurrent requests)
        key = tuple(request.prompt)
        waiting = self._waiting_prompts.get(key)
        if waiting is not None and self._fits(len(request.prompt), len(waiting) + len(group)):
            waiting += group
        else:
            self.waiting.append(group)
            self._waiting_prompts[key] = group
        return request_id

    def _check(self, request: _Request) -> str | None:
        prompt, sp = request.prompt, request.sampling
        if not prompt:
            return "empty prompt"
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            return f"prompt token ids must be in [0, {self.config.vocab_size}), got {min(prompt)}..{max(prompt)}"
        if len(prompt) + sp.max_tokens > self.max_model_len:
            return (f"prompt ({len(prompt)} tokens) + max_tokens ({sp.max_tokens}) exceeds max_model_len "
                    f"({self.max_model_len}): shorten the prompt, lower max_tokens or raise max_model_len")
        if sp.n > self.max_num_seqs:
            return f"n={sp.n} samples exceed max_num_seqs={self.max_num_seqs}"
        if not self._fits(len(prompt), sp.n):
            return (f"{sp.n} copies of a {len(prompt)}-token prompt do not fit the KV cache "
                    f"({self.stats.num_blocks - 1} blocks of {self.block_size}): lower n or raise the cache size")
        return None

    def _fits(self, prompt_len: int, copies: int) -> bool:
        """Whether `copies` sequences of a prompt can be admitted together (with one spare block each)."""
        blocks = math.ceil(prompt_len / self.block_size) + 1
        return copies <= self.max_num_seqs and copies * blocks <= self.stats.num_blocks - 1

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[RequestOutput]:
        """Generate for every prompt (continuous batching); outputs in the order of `prompts`."""
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, samplings, strict=True)]
        while self.has_unfinished():
            self.step()
        return [self._finished.pop(i) for i in ids]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    def step(self):
        """One prefill of newly admitted sequences, or else one decode step of all running ones; the tokens sampled
        by the step before are appended (and `on_token` called) while this one runs on the GPU."""
        if self.state is None:
            raise RuntimeError("the engine is asleep: call wake_up() first")
        start = time.perf_counter()
        groups = self._admit()
        if groups:
            self._prefill(groups)
            self.stats.prefill_seconds += time.perf_counter() - start
        elif self.running:
            self._decode()
            self.stats.decode_seconds += time.perf_counter() - start
        elif self._pending:  # tokens of sequences that had already stopped
            self._apply_pending()
        elif self.waiting:
            raise RuntimeError("a waiting request can never be admitted (checked at submission): engine bug")
        self.stats.max_running = max(self.stats.max_running, len(self.running))

    # --- scheduling ---
    def _admit(self) -> list[list[_Sequence]]:
        groups, tokens = [], 0
        while self.waiting:
            group = self.waiting[0]
            length = len(group[0].tokens)
            blocks = math.ceil(length / self.block_size)
            # keep one spare block per running sequence, so that the next decode step does not preempt at once
            spare = len(self.running) + sum(map(len, groups)) + len(group)
            if len(group) > len(self.free_slots) or len(group) * blocks + spare > len(self.free_blocks):
                break
            if groups and tokens + length > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            if self._waiting_prompts.get(tuple(group[0].tokens)) is group:
                del self._waiting_prompts[tuple(group[0].tokens)]
            sp = group[0].request.sampling
            for seq in group:
                seq.slot, seq.order = heapq.heappop(self.free_slots), next(self._order)
                self._slot_params.append((seq.slot, sp.temperature, sp.top_k, sp.top_p))
                seq.blocks = [self.free_blocks.pop() for _ in range(blocks)]
                self._table_writes += [(seq.slot, j, b) for j, b in enumerate(seq.blocks)]
            groups.append(group)
            tokens += length
        return groups

    def _release(self, seq: _Sequence):
        heapq.heappush(self.free_slots, seq.slot)
        self.free_blocks += reversed(seq.blocks)
        seq.slot, seq.blocks = -1, []

    def _preempt(self, seq: _Sequence):
        """Free a running sequence; it resumes later by a prefill of its prompt + generated tokens."""
        self._release(seq)
        self.running.remove(seq)
        self.waiting.appendleft([seq])
        self.stats.preemptions += 1

    @staticmethod
    def _next_position(seq: _Sequence) -> int:
        """Position of the token the next decode step feeds (the last sampled, maybe still on the device)."""
        return len(seq.tokens) - 1 + seq.in_flight

    def _ends_in_flight(self, seq: _Sequence) -> bool:
        """Whether the tokens in flight reach max_tokens or max_model_len: the sequence needs no further step."""
        length = len(seq.tokens) + seq.in_flight
        return length - len(seq.request.prompt) >= seq.request.sampling.max_tokens or length >= self.max_model_len

    def _reserve_decode_blocks(self, seqs: list[_Sequence]):
        """Give every sequence the block its next token goes to, preempting the youngest when none is free."""
        for seq in sorted(seqs, key=lambda s: s.order):
            if seq.slot < 0 or self._next_position(seq) // self.block_size < len(seq.blocks):
                continue  # finished or preempted in this loop, or its block is there
            if not self.free_blocks:
                # read the tokens in flight first: stopped sequences free their blocks, and a preempted one must
                # resume from all its tokens
                self._apply_pending()
            while not self.free_blocks and seq.slot >= 0:
                self._preempt(max(self.running, key=lambda s: s.order))
            if seq.slot >= 0:
                block = self.free_blocks.pop()
                self._table_writes.append((seq.slot, len(seq.blocks), block))
                seq.blocks.append(block)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy without waiting for the GPU (a copy from pageable memory would wait for the queued steps)."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _flush_slot_params(self):
        if self._slot_params:
            slot, *params = self._to_device(torch.tensor(self._slot_params, dtype=torch.float32).T)
            self._slot_sampling[:, slot.long()] = torch.stack(params)
            self._slot_params = []

    def _flush_table_writes(self):
        if self._table_writes:
            slot, index, block = self._to_device(torch.tensor(self._table_writes, dtype=torch.long).T)
            self._block_tables.index_put_((slot, index), block)
            self._table_writes = []

    # --- forwards ---
    def _forward_prefill(self, input_ids, cu_seqlens, slots, slot_mapping):
        self.state.begin_prefill(cu_seqlens, slots, slot_mapping)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids[None], cu_seqlens=cu_seqlens, past_key_values=self.state,
                             use_cache=True, logits_to_keep=cu_seqlens[1:] - 1)
        return out.logits[0]

    def _prefill(self, groups: list[list[_Sequence]]):
        leaders = [g[0] for g in groups]
        lengths = [len(s.tokens) for s in leaders]
        positions = torch.cat([torch.arange(n) for n in lengths])
        blocks = torch.cat([torch.tensor(s.blocks)[torch.arange(n) // self.block_size] for s, n in zip(leaders, lengths)])
        logits = self._forward_prefill(
            self._to_device(torch.tensor([t for s in leaders for t in s.tokens])),
            self._to_device(torch.tensor([0, *itertools.accumulate(lengths)])),
            self._to_device(torch.tensor([s.slot for s in leaders])),
            self._to_device(blocks * self.block_size + positions % self.block_size),
        )
        self.stats.prefill_forwards += 1
        for group in groups:
            if len(group) > 1:  # n samples: copies of the prompt's state instead of n prefills
                self.state.copy_sequence(group[0].slot, [s.slot for s in group[1:]], group[0].blocks,
                                         [s.blocks for s in group[1:]])
        rows = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(list(map(len, groups))))
        seqs = [s for g in groups for s in g]
        self.running += seqs
        self._sample(seqs, logits[self._to_device(rows)], self._to_device(torch.tensor([s.slot for s in seqs])))

    def _decode_forward(self, batch: int) -> torch.Tensor:
        ids, positions, slot_mapping, context_lens = self._step_inputs[:4, :batch]
        self.state.begin_decode(batch, slot_mapping)
        # no duck shaping: the inputs are views of buffers of max_num_seqs rows, and a trace at batch == max_num_seqs
        # would tie the batch to the buffer's size (then every other bucket recompiles)
        with torch.inference_mode(), fx_config.patch(use_duck_shape=False):
            out = self._decode_model(input_ids=ids[:, None], position_ids=positions[:, None], past_key_values=self.state,
                             use_cache=True, logits_to_keep=1,
                             paged_decode=PagedDecode(self._block_tables[:batch], context_lens))
        return out.logits[:, -1]

    def _decode(self):
        seqs = [s for s in self.running if not self._ends_in_flight(s)]
        self._reserve_decode_blocks(seqs)
        seqs = [s for s in seqs if s.slot >= 0]
        if not seqs:  # all end with their tokens in flight, or all were preempted (the next step prefills them)
            self._apply_pending()
            return
        # the host's share of every step: numpy arrays, as torch.tensor of Python lists costs ~10x more
        slots = torch.from_numpy(np.array([s.slot for s in seqs]))
        top = int(slots.max())
        batch = next(b for b in self._buckets if b > top)
        inputs = torch.zeros(4, batch, dtype=torch.long)  # rows 1.. of the step inputs: the ids are on the device
        inputs[2] = 1  # empty slots: one (scratch) key, written at slot 0 of the scratch block
        pos = [self._next_position(s) for s in seqs]
        bs = self.block_size
        inputs[:3, slots] = torch.from_numpy(np.array([
            pos, [s.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, pos)], [p + 1 for p in pos],
        ]))
        inputs[3, :len(seqs)] = slots
        self._step_inputs[1:, :batch].copy_(self._to_device(inputs))
        self._flush_table_writes()
        if batch in self._graphs:
            graph, logits = self._graphs[batch]
            graph.replay()
        else:
            logits = self._decode_forward(batch)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(seqs)
        self.stats.decode_kv_tokens += sum(pos) + len(pos)
        rows = self._step_inputs[4, :len(seqs)]
        self._sample(seqs, logits[rows], rows)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, slots: torch.Tensor):
        """Queue the sampling of the next token of `seqs` (in `slots`) from their logits rows, its tokens written as
        the next decode inputs of those slots; then, while the GPU works, read the previous step's tokens."""
        self._flush_slot_params()
        temperature, top_k, top_p = self._slot_sampling[:, slots]
        generators = [s.generator for s in seqs]
        tokens, logprobs = sample(logits, temperature, top_k, top_p, [s.request.sampling for s in seqs],
                                  generators if any(generators) else None)
        self._step_inputs[0].index_copy_(0, slots, tokens)
        for seq in seqs:
            seq.in_flight += 1
        to_host = lambda t: None if t is None else t.to("cpu", non_blocking=True)  # noqa: E731  (pinned: async)
        tokens, logprobs, done = to_host(tokens), to_host(logprobs), None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()  # after the copies to the host: `_apply_pending` waits for it
        self._apply_pending()
        self._pending = (seqs, tokens, logprobs, done)

    def _apply_pending(self):
        """Append the last step's sampled tokens to their sequences (waiting for the GPU if it is not done) and
        finish those that stop."""
        if self._pending is None:
            return
        seqs, tokens, logprobs, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        logprobs = [None] * len(seqs) if logprobs is None else logprobs.tolist()
        for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs):
            seq.in_flight -= 1
            if seq.slot < 0:  # it stopped at the step before: this token was computed ahead and is dropped
                continue
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            reason = self._finish_reason(seq, token)
            if seq.request.on_token:
                seq.request.on_token(seq.index, token, logprob, reason)
            if reason:
                self._finish(seq, reason)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        sp = seq.request.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_generated >= sp.max_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def abort(self, request_ids=None) -> int:
        """Finish the given unfinished requests (default: all) now. Their samples keep the tokens generated so far,
        with finish_reason "abort". Returns the number of requests aborted."""
        self._apply_pending()
        hit = lambda seq: request_ids is None or seq.request.request_id in request_ids  # noqa: E731
        requests = {id(s.request) for s in [*self.running, *(s for g in self.waiting for s in g)] if hit(s)}
        for seq in [s for s in self.running if hit(s)]:
            self._finish(seq, "abort")
        for group in self.waiting:
            for seq in [s for s in group if hit(s)]:
                self._finish(seq, "abort")
        self.waiting = deque(kept for g in self.waiting if (kept := [s for s in g if not hit(s)]))
        self._waiting_prompts.clear()  # only an optimisation: later requests start new groups
        return len(requests)

    def _finish(self, seq: _Sequence, reason: str):
        if seq.slot >= 0:  # running (an aborted waiting sequence holds nothing)
            self._release(seq)
            self.running.remove(seq)
        request = seq.request
        generated = seq.tokens[len(request.prompt):]
        request.samples[seq.index] = Sample(generated, seq.logprobs if request.sampling.logprobs else None, reason)
        request.pending -= 1
        if request.pending == 0:
            self._deliver(RequestOutput(request.request_id, request.prompt, request.samples), request.on_done)

    def _deliver(self, output: RequestOutput, on_done):
        if on_done is None:
            self._finished[output.request_id] = output
        else:
            on_done(output)
