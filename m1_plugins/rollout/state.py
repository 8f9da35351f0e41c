"""The engine's generation state, handed to `M1ForCausalLM.forward` as `past_key_values`.

Mamba layers: conv and SSM state in per-sequence *slots* (max_num_seqs of them, allocated once).
Attention layers: KV in a pool of fixed-size blocks shared by all sequences (`paged_attention`), so memory
follows the tokens actually generated. All buffers stay at fixed addresses: CUDA graphs captured over them
remain valid for the engine's lifetime (until `release`).

One object serves both kinds of forward, set up before each:
- prefill (`begin_prefill`): one packed row of new sequences (`cu_seqlens`); each sequence's final Mamba state
  goes to its slot and its KV to its blocks (`slot_mapping`, one flat KV position per token);
- decode (`begin_decode`): one token for each of the slots 0..batch-1; the Mamba layers update their slots in
  place and attention reads the pools.
"""

import torch

from ..modeling.cache import state_shapes
from .paged_attention import write_kv


class PagedHybridState:
    def __init__(self, config, max_num_seqs: int, num_blocks: int, block_size: int, dtype, device):
        shapes = state_shapes(config, max_num_seqs)
        kinds = config.layers_block_type
        ssm_dtype = torch.float32 if config.mamba_state_dtype == "float32" else dtype
        kv_shape = (num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        self.k_pools = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i, k in enumerate(kinds) if k == "attention"}
        self.v_pools = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in self.k_pools}
        mamba = [i for i, k in enumerate(kinds) if k == "mamba"]
        self.conv_slots = {i: torch.zeros(shapes["conv"], dtype=dtype, device=device) for i in mamba}
        self.ssm_slots = {i: torch.zeros(shapes["ssm"], dtype=ssm_dtype, device=device) for i in mamba}
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)
        self.has_previous_state = False
        self.cu_seqlens = self.slots = self.slot_mapping = None
        self.conv_states, self.ssm_states = {}, {}

    def begin_prefill(self, cu_seqlens, slots, slot_mapping):
        self.has_previous_state = False
        self.cu_seqlens, self.slots, self.slot_mapping = cu_seqlens, slots, slot_mapping

    def begin_decode(self, batch: int, slot_mapping):
        self.has_previous_state = True
        self.cu_seqlens, self.slots, self.slot_mapping = None, None, slot_mapping
        self.conv_states = {i: t[:batch] for i, t in self.conv_slots.items()}
        self.ssm_states = {i: t[:batch] for i, t in self.ssm_slots.items()}

    # --- the cache protocol of M1Model.forward ---
    def update(self, key, value, layer_idx, *args, **kwargs):
        """key/value: (batch, kv_heads, q_len, head_dim). Prefill: returns them for attention within the row.
        Decode: returns the layer's pools, which `paged_attention_forward` reads through the block tables."""
        write_kv(self.k_pools[layer_idx], self.v_pools[layer_idx], key.transpose(1, 2).flatten(0, 1),
                 value.transpose(1, 2).flatten(0, 1), self.slot_mapping)
        if self.has_previous_state:
            return self.k_pools[layer_idx], self.v_pools[layer_idx]
        return key, value

    def store_mamba_states(self, layer_idx, conv_state, ssm_state):
        self.conv_slots[layer_idx].index_copy_(0, self.slots, conv_state.to(self.conv_slots[layer_idx].dtype))
        self.ssm_slots[layer_idx].index_copy_(0, self.slots, ssm_state.to(self.ssm_slots[layer_idx].dtype))

    def get_seq_length(self, layer_idx=None) -> int:
        return 0  # positions are always passed explicitly

    def advance(self, num_tokens: int):
        pass

    # --- copies for n samples of one prompt ---
    def copy_sequence(self, src_slot: int, dst_slots: list[int], src_blocks: list[int], dst_blocks: list[list[int]]):
        """Give each `dst_slots[j]` the Mamba state of `src_slot` and a copy of the KV in `src_blocks`."""
        dst = torch.tensor(dst_slots, device=self.device)
        for states in (self.conv_slots, self.ssm_slots):
            for t in states.values():
                t[dst] = t[src_slot].clone()
        if src_blocks:
            src = torch.tensor(src_blocks, device=self.device).repeat(len(dst_slots))
            dst = torch.tensor([b for blocks in dst_blocks for b in blocks], device=self.device)
            for pool in (*self.k_pools.values(), *self.v_pools.values()):
                pool[dst] = pool[src]  # an index gather: a copy
