"""M1Config: a Llama decoder whose layers outside `attn_layers` are Mamba-2 mixers."""

import math

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..ops import BACKENDS


@strict
class M1Config(LlamaConfig):
    r"""
    Everything of [`LlamaConfig`] (RMSNorm, SwiGLU MLP, RoPE including Llama-3 rope scaling, GQA, optional
    attention bias, tied or untied embeddings) applies unchanged; the fields below describe the hybrid.
    The mixer keeps the parameter layout of transformers' Mamba-2 hybrids (in_proj rows z | x | B | C | dt,
    depthwise conv1d over xBC, per-head A_log / D / dt_bias, gated RMSNorm grouped by `mamba_n_groups`).

    attn_layers (`list[int]`, *optional*, defaults to `[]`):
        Indices of the decoder layers that stay attention layers; every other layer is a Mamba-2 mixer.
    mamba_d_state (`int`, *optional*, defaults to 16):
        SSM state size per group (the paper's "SSM state 16").
    mamba_head_dim (`int`, *optional*, defaults to 16):
        Channels of x per SSM head; the number of SSM heads is `mamba_expand * hidden_size / mamba_head_dim`.
    mamba_n_groups (`int`, *optional*):
        Number of B/C groups (SSM heads are split evenly among them). Defaults to one group per SSM head,
        which gives the paper's 192 groups of 16 on Llama-3.2-3B and the head-aligned layout
        (`mamba_d_state = mamba_head_dim = head_dim`) when the heads are attention-sized.
    mamba_expand (`int`, *optional*, defaults to 1):
        Mixer width `d_inner = mamba_expand * hidden_size`. Conversion from attention needs
        `d_inner == num_attention_heads * head_dim`.
    mamba_d_conv (`int`, *optional*, defaults to 4):
        Width of the causal depthwise convolution over x, B and C.
    mamba_chunk_size (`int`, *optional*, defaults to 256):
        Chunk length of the SSD scan (a speed setting: results do not depend on it).
    mamba_dt_min / mamba_dt_max (`float`, *optional*, defaults to 0.001 / 0.1):
        Range of the initial time steps (dt_bias is initialised to softplus^-1 of a log-uniform sample).
    mamba_dt_init_floor (`float`, *optional*, defaults to 1e-4):
        Lower bound of that initial sample.
    mamba_dt_limit (`tuple[float, float]`, *optional*, defaults to `(0.0, inf)`):
        Clamp applied to dt after the softplus.
    mamba_conv_bias (`bool`, *optional*, defaults to `True`):
        Whether conv1d has a bias.
    mamba_proj_bias (`bool`, *optional*, defaults to `False`):
        Whether in_proj and out_proj have biases (set by conversion from a teacher with attention_bias).
    mamba_xb_expansion (`int`, *optional*, defaults to 1):
        The paper's learned GQA expansion: in_proj emits x and B at `1/mamba_xb_expansion` of their width and
        the linears `x_expand`, `B_expand` (which `m1 convert` initialises as a head repeat) restore it, before the convolution,
        so export can fold them into in_proj exactly. 1 means no expansion (x and B at full width).
    mamba_kernels (`str`, *optional*, defaults to `"auto"`):
        "auto" uses the mamba-ssm CUDA kernels when the model is on a GPU and they are installed, else the
        PyTorch reference; "reference" forces the reference; "cuda" requires the kernels (error otherwise).
    mamba_state_dtype (`str`, *optional*, defaults to `"float32"`):
        dtype of the SSM state kept during generation: "float32" (recommended for long decodes) or "model".
    """

    model_type = "m1_hybrid"

    attn_layers: list[int] | None = None
    mamba_d_state: int = 16
    mamba_head_dim: int = 16
    mamba_n_groups: int | None = None
    mamba_expand: int = 1
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_dt_min: float | int = 0.001
    mamba_dt_max: float | int = 0.1
    mamba_dt_init_floor: float | int = 1e-4
    mamba_dt_limit: list[float | int] | tuple[float | int, float | int] = (0.0, math.inf)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_xb_expansion: int = 1
    mamba_kernels: str = "auto"
    mamba_state_dtype: str = "float32"

    def __post_init__(self, **kwargs):
        self.attn_layers = sorted(self.attn_layers or [])
        self.mamba_dt_limit = tuple(float(v) for v in self.mamba_dt_limit)
        self._check_sizes()  # before the default mamba_n_groups divides by mamba_head_dim
        if self.mamba_n_groups is None:
            self.mamba_n_groups = self.mamba_d_inner // self.mamba_head_dim
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This checkpoint is model_type={model_type!r}, not an M1 hybrid ({cls.model_type!r}). Load it with its own "
                "class, or turn a Llama checkpoint into a hybrid first: m1 convert --teacher DIR --out DIR"
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_n_heads(self) -> int:
        return self.mamba_d_inner // self.mamba_head_dim

    @property
    def layers_block_type(self) -> list[str]:
        return ["attention" if i in self.attn_layers else "mamba" for i in range(self.num_hidden_layers)]

    def _check_sizes(self):
        """A zero or negative size builds a mixer without state or heads (or an endless scan): refused by name."""
        sizes = ("mamba_d_state", "mamba_head_dim", "mamba_chunk_size", "mamba_d_conv", "mamba_expand")
        bad = [f"{name}={getattr(self, name)}" for name in sizes if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: Mamba sizes must be positive integers.")

    def validate_architecture(self):
        """Part of `@strict` validation: every inconsistency names the values and the fix."""
        super().validate_architecture()
        n = self.num_hidden_layers
        bad = [i for i in self.attn_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"attn_layers {bad} are out of range for num_hidden_layers={n}: use indices 0..{n - 1}.")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers {self.attn_layers} lists a layer twice.")
        if self.mamba_d_inner % self.mamba_head_dim:
            raise ValueError(
                f"mamba_head_dim={self.mamba_head_dim} must divide d_inner = mamba_expand * hidden_size = {self.mamba_d_inner}."
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(f"mamba_n_groups={self.mamba_n_groups} must divide the number of SSM heads ({self.mamba_n_heads}).")
        r = self.mamba_xb_expansion
        if r < 1 or self.mamba_n_heads % r or (self.mamba_n_groups * self.mamba_d_state) % r:
            raise ValueError(
                f"mamba_xb_expansion={r} must be >= 1 and divide both the SSM heads ({self.mamba_n_heads}) "
                f"and the B width (mamba_n_groups * mamba_d_state = {self.mamba_n_groups * self.mamba_d_state})."
            )
        if self.mamba_kernels not in BACKENDS:
            raise ValueError(f"mamba_kernels must be one of {BACKENDS}, got {self.mamba_kernels!r}.")
        if self.mamba_state_dtype not in ("float32", "model"):
            raise ValueError(f"mamba_state_dtype must be 'float32' or 'model', got {self.mamba_state_dtype!r}.")
