"""M1ForCausalLM: the one model definition used for training, the RL actor, rollout and eval.

A Llama decoder (attention, MLP, norms and RoPE are transformers' own Llama modules, reused unchanged)
in which the layers outside `config.attn_layers` are Mamba-2 mixers. Packing is exact in both layer
kinds: document boundaries come from `position_ids` resets or `cu_seqlens`, and are turned once per
forward into `seq_idx` (Mamba) and a block-diagonal causal mask (attention).
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from ..ops import (
    causal_conv1d, causal_conv1d_update, last_conv_inputs, resolve_backend, rmsnorm_gated, ssd_chunk_scan, ssd_step,
)
from .cache import M1HybridCache
from .configuration_m1 import M1Config
from .packing import attention_bias, position_ids_from_seq_idx, seq_idx_from_cu_seqlens, seq_idx_from_position_ids


# The scan's result does not depend on the chunk size; the PyTorch reference is fastest on CPUs with short
# chunks (its intra-chunk work grows with chunk_size^2), the Triton kernels with the configured one.
REFERENCE_CHUNK_SIZE = 64


def init_ssm_parameters(config: M1Config, generator=None) -> dict[str, torch.Tensor]:
    """Standard Mamba-2 init of the per-head parameters: dt log-uniform in [dt_min, dt_max] (stored as
    softplus^-1 in dt_bias), A uniform in [1, 16] (stored as log), D = 1."""
    n, c = config.mamba_n_heads, config
    u = torch.rand(n, generator=generator)
    dt = torch.exp(u * (math.log(c.mamba_dt_max) - math.log(c.mamba_dt_min)) + math.log(c.mamba_dt_min))
    dt = dt.clamp(min=c.mamba_dt_init_floor)
    A = torch.empty(n).uniform_(1, 16, generator=generator)
    return {"dt_bias": dt + torch.log(-torch.expm1(-dt)), "A_log": torch.log(A), "D": torch.ones(n)}


class M1RMSNormGated(nn.Module):
    """norm(y * silu(z)) per group of `group_size` channels (see `ops.norm`)."""

    def __init__(self, hidden_size, group_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size, self.variance_epsilon = group_size, eps

    def forward(self, hidden_states, gate, backend="reference"):
        return rmsnorm_gated(hidden_states, self.weight, z=gate, eps=self.variance_epsilon,
                             group_size=self.group_size, backend=backend)


class M1Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj -> (z, x, B, C, dt); causal conv over xBC; SSD scan; gated norm; out_proj."""

    def __init__(self, config: M1Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.d_inner, self.n_heads, self.head_dim = config.mamba_d_inner, config.mamba_n_heads, config.mamba_head_dim
        self.n_groups, self.d_state = config.mamba_n_groups, config.mamba_d_state
        bc_dim = self.n_groups * self.d_state
        r = config.mamba_xb_expansion
        # widths of z | x | B | C | dt as emitted by in_proj (x and B narrower under the learned expansion)
        self.split_sizes = [self.d_inner, self.d_inner // r, bc_dim // r, bc_dim, self.n_heads]
        self.conv_dim = self.d_inner + 2 * bc_dim
        self.in_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=config.mamba_proj_bias)
        if r > 1:
            self.x_expand = nn.Linear(self.d_inner // r, self.d_inner, bias=False)
            self.B_expand = nn.Linear(bc_dim // r, bc_dim, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim,
                                padding=config.mamba_d_conv - 1, bias=config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = M1RMSNormGated(self.d_inner, self.d_inner // self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        for name, value in init_ssm_parameters(self.config).items():
            init.copy_(getattr(self, name), value)

    def forward(self, hidden_states, seq_idx=None, token_mask=None, cache: M1HybridCache | None = None):
        """hidden_states: (batch, seqlen, hidden); token_mask: (batch, seqlen), 0 at padding."""
        backend = resolve_backend(self.config.mamba_kernels, hidden_states.device)
        batch, seqlen, _ = hidden_states.shape
        zxbcdt = self.in_proj(hidden_states)
        if hasattr(self, "x_expand"):
            z, x, B, C, dt = zxbcdt.split(self.split_sizes, dim=-1)
            xBC = torch.cat([self.x_expand(x), self.B_expand(B), C], dim=-1)
        else:  # x | B | C are adjacent rows of in_proj: a view, no copy
            z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if token_mask is not None:  # padding must not enter the conv window or the state
            xBC = xBC * token_mask[..., None].to(xBC.dtype)
        A = -torch.exp(self.A_log.float())
        conv_weight = self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)
        ssm_args = dict(D=self.D, dt_bias=self.dt_bias, dt_limit=self.config.mamba_dt_limit, backend=backend)

        if cache is not None and cache.has_previous_state and seqlen == 1:  # one decode step
            xBC = causal_conv1d_update(xBC[:, 0], cache.conv_states[self.layer_idx], conv_weight,
                                       self.conv1d.bias, backend=backend)
            x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
            y = ssd_step(cache.ssm_states[self.layer_idx], x.view(batch, self.n_heads, self.head_dim), dt[:, 0], A,
                         B.view(batch, self.n_groups, self.d_state), C.view(batch, self.n_groups, self.d_state), **ssm_args)
            y = y.view(batch, 1, self.d_inner)
        else:
            continuing = cache is not None and cache.has_previous_state
            # a cache with `cu_seqlens` (the rollout engine) takes one packed row of new sequences: one state each
            cu_seqlens = getattr(cache, "cu_seqlens", None)
            conv_init = cache.conv_states[self.layer_idx] if continuing else None
            xBC_t = xBC.transpose(1, 2)  # (b, conv_dim, l)
            if cache is not None:  # the last d_conv - 1 inputs, for the next step
                history = xBC_t if conv_init is None else torch.cat([conv_init.to(xBC_t.dtype), xBC_t], dim=-1)
                conv_state = last_conv_inputs(history, self.conv1d.kernel_size[0], cu_seqlens)
            xBC = causal_conv1d(xBC_t, conv_weight, self.conv1d.bias, seq_idx=seq_idx, initial_states=conv_init,
                                backend=backend).transpose(1, 2)
            if token_mask is not None:
                xBC = xBC * token_mask[..., None].to(xBC.dtype)
            x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
            y, final_state = ssd_chunk_scan(
                x.reshape(batch, seqlen, self.n_heads, self.head_dim), dt, A,
                B.reshape(batch, seqlen, self.n_groups, self.d_state), C.reshape(batch, seqlen, self.n_groups, self.d_state),
                self.config.mamba_chunk_size if backend == "cuda" else REFERENCE_CHUNK_SIZE,
                initial_states=cache.ssm_states[self.layer_idx] if continuing else None,
                seq_idx=seq_idx, cu_seqlens=cu_seqlens, **ssm_args,
            )
            if cache is not None:
                cache.store_mamba_states(self.layer_idx, conv_state, final_state)
            y = y.reshape(batch, seqlen, self.d_inner)
        return self.out_proj(self.norm(y, z, backend=backend))


class M1DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: M1Config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layers_block_type[layer_idx]
        if self.layer_type == "attention":
            self.self_attn = LlamaAttention(config, layer_idx)
        else:
            self.mamba = M1Mamba2Mixer(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, seq_idx=None, token_mask=None,
                past_key_values=None, **attn_kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == "attention":
            hidden_states, _ = self.self_attn(hidden_states, position_embeddings, attention_mask,
                                              past_key_values=past_key_values, **attn_kwargs)
        else:
            hidden_states = self.mamba(hidden_states, seq_idx=seq_idx, token_mask=token_mask, cache=past_key_values)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class M1PreTrainedModel(PreTrainedModel):
    config_class = M1Config
    config: M1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M1DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _is_stateful = True  # recurrent state: no cache cropping (assisted decoding)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, M1Mamba2Mixer):
            module.reset_ssm_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds an M1HybridCache itself


class M1Model(M1PreTrainedModel):
    def __init__(self, config: M1Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([M1DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cu_seqlens=None, **kwargs) -> BaseModelOutputWithPast:
        """attention_mask: (batch, past + seqlen), 0 at padding (nonzero document ids also count as valid).
        Packed rows: `position_ids` restarting at 0 per document, or `cu_seqlens` for a (1, total) row.
        Other keyword arguments reach the attention function (transformers' convention)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seqlen, _ = inputs_embeds.shape
        device = inputs_embeds.device
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = M1HybridCache(self.config, batch, inputs_embeds.dtype, device)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D (batch, past + seqlen), got shape {tuple(attention_mask.shape)}.")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing is padding
        seq_idx = None
        if cu_seqlens is not None:
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens.to(device), seqlen)
            if position_ids is None:
                position_ids = position_ids_from_seq_idx(seq_idx)
            if len(cu_seqlens) == 2:  # one document: plain causal attention (no seqlen^2 mask), no state resets
                seq_idx = None
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seqlen:]
            else:
                position_ids = torch.arange(past_len, past_len + seqlen, device=device)[None].expand(batch, -1)
        elif seq_idx is None and past_len == 0:
            seq_idx = seq_idx_from_position_ids(position_ids)
        token_mask = attention_mask[:, -seqlen:] != 0 if attention_mask is not None else None

        attn_kwargs = {}
        if self.config._attn_implementation.startswith("flash"):
            # transformers' flash path unpads a 2D mask, and splits packed rows itself from position_ids
            mask = attention_mask
            attn_kwargs["position_ids"] = position_ids
        else:
            mask = attention_bias(seqlen, past_len, seq_idx, attention_mask, inputs_embeds.dtype, device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, attention_mask=mask,
                                  seq_idx=seq_idx, token_mask=token_mask, past_key_values=past_key_values,
                                  **attn_kwargs, **kwargs)
        if past_key_values is not None:
            past_key_values.advance(seqlen)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class M1ForCausalLM(M1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: M1Config):
        super().__init__(config)
        self.model = M1Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                cu_seqlens=None, **kwargs) -> CausalLMOutputWithPast:
        """`cu_seqlens` is a named parameter because VeRL passes it only to models that declare it."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             cu_seqlens=cu_seqlens, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
