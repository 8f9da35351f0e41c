"""Generation state of an M1 hybrid: KV for attention layers, conv + SSM state for Mamba layers."""

import torch


def state_shapes(config, batch_size: int = 1, tp_size: int = 1) -> dict[str, tuple[int, ...]]:
    """Per-layer state shapes (one pure function shared by the cache, the engine and the adapters).

    conv: (batch, conv_dim, d_conv - 1), the last inputs of the causal conv over x | B | C
    ssm:  (batch, n_heads, head_dim, d_state)
    kv:   (batch, num_key_value_heads, <tokens>, head_dim) per attention layer, for K and for V
    """
    c = config
    if c.mamba_n_heads % tp_size or c.num_key_value_heads % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the SSM heads ({c.mamba_n_heads}) and KV heads ({c.num_key_value_heads}).")
    conv_dim = c.mamba_d_inner + 2 * c.mamba_n_groups * c.mamba_d_state
    return {
        "conv": (batch_size, conv_dim // tp_size, c.mamba_d_conv - 1),
        "ssm": (batch_size, c.mamba_n_heads // tp_size, c.mamba_head_dim, c.mamba_d_state),
        "kv": (batch_size, c.num_key_value_heads // tp_size, 0, c.head_dim),
    }


def state_bytes_per_token(config, dtype_bytes: int = 2) -> dict[str, int]:
    """Memory of the state: KV grows per token (attention layers); the Mamba state is fixed per sequence."""
    shapes = state_shapes(config)
    kinds = config.layers_block_type
    n_attn, n_mamba = kinds.count("attention"), kinds.count("mamba")
    kv = 2 * shapes["kv"][1] * shapes["kv"][3] * dtype_bytes * n_attn
    conv = torch.Size(shapes["conv"]).numel() * dtype_bytes
    ssm = torch.Size(shapes["ssm"]).numel() * (4 if config.mamba_state_dtype == "float32" else dtype_bytes)
    return {"kv_bytes_per_token": kv, "mamba_bytes_per_sequence": (conv + ssm) * n_mamba}


class M1HybridCache:
    """Per-layer state for `generate` and incremental decoding.

    Attention layer i: `key_cache[i]`, `value_cache[i]`: (batch, num_key_value_heads, seq_len, head_dim),
    appended to at every step. Mamba layer i: `conv_states[i]` (batch, conv_dim, d_conv - 1) and
    `ssm_states[i]` (batch, n_heads, head_dim, d_state), in fp32 unless `mamba_state_dtype="model"`.
    `has_previous_state` turns False -> True after the first (prefill) forward.
    """

    is_compileable = False
    cu_seqlens = None  # one sequence per row (the rollout engine's cache packs several into one row)

    def __init__(self, config, batch_size: int, dtype: torch.dtype, device):
        shapes = state_shapes(config, batch_size)
        ssm_dtype = torch.float32 if config.mamba_state_dtype == "float32" else dtype
        self.layer_types = config.layers_block_type
        self.key_cache, self.value_cache, self.conv_states, self.ssm_states = {}, {}, {}, {}
        for i, kind in enumerate(self.layer_types):
            if kind == "mamba":
                self.conv_states[i] = torch.zeros(shapes["conv"], dtype=dtype, device=device)
                self.ssm_states[i] = torch.zeros(shapes["ssm"], dtype=ssm_dtype, device=device)
        self.has_previous_state = False
        self._seen_tokens = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Append this step's K/V of an attention layer; return the full K/V (the `Cache.update` contract)."""
        if layer_idx in self.key_cache:
            key_states = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        self.key_cache[layer_idx], self.value_cache[layer_idx] = key_states, value_states
        return key_states, value_states

    def store_mamba_states(self, layer_idx: int, conv_state, ssm_state):
        """Keep a Mamba layer's state after a multi-token forward."""
        self.conv_states[layer_idx].copy_(conv_state)
        self.ssm_states[layer_idx].copy_(ssm_state)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return self._seen_tokens

    def advance(self, num_tokens: int):
        self._seen_tokens += num_tokens
        self.has_previous_state = True

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for states in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            for i, t in states.items():
                states[i] = t.index_select(0, beam_idx.to(t.device))
