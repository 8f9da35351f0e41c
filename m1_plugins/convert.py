"""Transformer -> M1 hybrid initialisation (MambaInLlama; M1 paper, Algorithm 1).

Each replaced attention layer becomes a Mamba-2 mixer with, per head,
    C <- W_Q,  B <- W_K,  x <- W_V,  out_proj <- W_O
(GQA K/V expanded to all heads, by a repeat or by the paper's learned expansion initialised as that
repeat). New parameters: the dt rows of in_proj (normal init), dt_bias and A_log (standard Mamba-2 init),
D = 1, the gated norm = 1, and the conv = identity (last tap 1), so that at initialisation x, B and C are
exactly silu(V o), silu(K o), silu(Q o). MLPs, norms, embeddings and the kept attention layers are copied
exactly: with every layer kept, the hybrid is the teacher.

The z gate starts open by default (`gate="open"`, as MOHAWK does): its rows of in_proj are zero and its bias is
OPEN_GATE_BIAS, so silu(z) = 1 and the mixer's output is the normalised SSM output, the attention's
analogue. MambaInLlama's random z rows (`gate="random"`) multiply every channel by silu(z) ~ z / 2, a random
token-dependent sign that the student must first unlearn. The open gate needs in_proj's bias, so the hybrid
gets `mamba_proj_bias` (zero for every other row, and for out_proj).

Pure functions (`convert_config`, `convert_state_dict`) do the work; `convert_to_hybrid` builds the
model. The state dict is converted by popping teacher tensors as they are used, so the peak memory
stays close to one copy of the model.
"""

import json
import logging
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .modeling import M1Config, M1ForCausalLM
from .modeling.modeling_m1 import init_ssm_parameters

logger = logging.getLogger(__name__)

SUPPORTED_TEACHERS = ("llama",)
LAYOUTS = ("m1", "head-aligned")
XB_EXPANSIONS = ("repeat", "learned")
GATES = ("open", "random")
OPEN_GATE_BIAS = 1.2784645427610737  # silu(b) = b * sigmoid(b) = 1
PAPER_ATTN_LAYERS = [3, 8, 13, 18, 23, 27]  # M1-3B: 6 of Llama-3.2-3B's 28 layers
_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map", "quantization_config")
_ATTN_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$")


def spaced_attn_layers(num_layers: int, num_attn: int) -> list[int]:
    """`num_attn` layer indices spread evenly over the depth, the last layer always included."""
    if not 0 <= num_attn <= num_layers:
        raise ValueError(f"--num-attn-layers must be between 0 and the teacher's {num_layers} layers, got {num_attn}.")
    return sorted({round(num_layers - 1 - k * num_layers / num_attn) for k in range(num_attn)})


def convert_config(teacher_config, attn_layers, layout: str = "m1", xb_expansion: str = "repeat", gate: str = "open",
                   **mixer_options) -> M1Config:
    """M1Config for a Llama-family teacher config.

    layout "m1": SSM state 16, SSM heads of 16 channels, one B/C group per SSM head (the paper's 192 groups
    of 16 on Llama-3.2-3B). layout "head-aligned": d_state = head_dim = the attention head_dim, one group
    per attention head (mirrors linear attention). `mixer_options` (e.g. mamba_d_state=32) override either.
    """
    model_type = getattr(teacher_config, "model_type", None)
    if model_type not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"Conversion supports Llama-family teachers (model_type in {SUPPORTED_TEACHERS}); this checkpoint is "
            f"model_type={model_type!r}. Convert from a Llama checkpoint (e.g. Llama-3.2-3B-Instruct or `m1 teacher`)."
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if xb_expansion not in XB_EXPANSIONS:
        raise ValueError(f"xb_expansion must be one of {XB_EXPANSIONS}, got {xb_expansion!r}.")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}.")
    n_layers = teacher_config.num_hidden_layers
    bad = [i for i in attn_layers if not 0 <= i < n_layers]
    if bad or len(set(attn_layers)) != len(attn_layers):
        raise ValueError(
            f"attention layers {list(attn_layers)} must be distinct indices in 0..{n_layers - 1} (the teacher has {n_layers} layers)."
        )
    n_heads, n_kv = teacher_config.num_attention_heads, teacher_config.num_key_value_heads
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // n_heads
    attn_width = n_heads * head_dim
    if attn_width % teacher_config.hidden_size:
        raise ValueError(
            f"num_attention_heads * head_dim = {attn_width} must be a multiple of hidden_size = {teacher_config.hidden_size} "
            "for x <- W_V to fill the mixer width."
        )
    if layout == "m1":
        options = {"mamba_d_state": 16, "mamba_head_dim": 16}
    else:
        options = {"mamba_d_state": head_dim, "mamba_head_dim": head_dim, "mamba_n_groups": n_heads}
    options.update(mixer_options)
    fields = {k: v for k, v in teacher_config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
    config = M1Config(
        **{**fields, **options},
        attn_layers=sorted(attn_layers),
        mamba_expand=attn_width // teacher_config.hidden_size,
        mamba_proj_bias=bool(getattr(teacher_config, "attention_bias", False)) or gate == "open",
        mamba_xb_expansion=n_heads // n_kv if xb_expansion == "learned" else 1,
        architectures=["M1ForCausalLM"],
    )
    if config.mamba_n_groups * config.mamba_d_state != attn_width:
        raise ValueError(
            f"C <- W_Q needs mamba_n_groups * mamba_d_state == num_attention_heads * head_dim ({attn_width}); got "
            f"{config.mamba_n_groups} * {config.mamba_d_state}. Use --layout m1 or head-aligned, or set both consistently."
        )
    return config


def _expand_heads(w: torch.Tensor, n_kv: int, rep: int) -> torch.Tensor:
    """Rows of a K/V projection (n_kv * head_dim, ...) repeated per head, as transformers' repeat_kv does."""
    return w.unflatten(0, (n_kv, -1)).repeat_interleave(rep, dim=0).flatten(0, 1)


def _mixer_from_attention(layer: int, teacher_sd: dict, config: M1Config, generator, gate: str) -> dict:
    """Mixer parameters of `layer` from its attention projections (popped from `teacher_sd`)."""
    src, dst = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mamba."
    q, k, v, o = (teacher_sd.pop(f"{src}{n}_proj.weight") for n in "qkvo")
    dtype, hidden = q.dtype, config.hidden_size
    n_kv = config.num_key_value_heads
    rep = config.num_attention_heads // n_kv
    learned = config.mamba_xb_expansion > 1
    x_rows, b_rows = (v, k) if learned else (_expand_heads(v, n_kv, rep), _expand_heads(k, n_kv, rep))
    d_inner, n_heads = config.mamba_d_inner, config.mamba_n_heads

    def normal(*shape):
        return torch.empty(*shape, dtype=dtype).normal_(0.0, config.initializer_range, generator=generator)

    z_rows = torch.zeros(d_inner, hidden, dtype=dtype) if gate == "open" else normal(d_inner, hidden)
    out = {
        dst + "in_proj.weight": torch.cat([z_rows, x_rows, b_rows, q, normal(n_heads, hidden)]),
        dst + "out_proj.weight": o,
        dst + "norm.weight": torch.ones(d_inner, dtype=dtype),
    }
    if config.mamba_proj_bias:
        if f"{src}q_proj.bias" in teacher_sd:
            qb, kb, vb, ob = (teacher_sd.pop(f"{src}{n}_proj.bias") for n in "qkvo")
        else:  # a teacher without attention biases: the open gate's bias alone is new
            qb, kb, vb, ob = (torch.zeros(w.shape[0], dtype=dtype) for w in (q, k, v, o))
        xb, bb = (vb, kb) if learned else (_expand_heads(vb, n_kv, rep), _expand_heads(kb, n_kv, rep))
        zb = torch.full((d_inner,), OPEN_GATE_BIAS if gate == "open" else 0.0, dtype=dtype)
        out[dst + "in_proj.bias"] = torch.cat([zb, xb, bb, qb, torch.zeros(n_heads, dtype=dtype)])
        out[dst + "out_proj.bias"] = ob
    if learned:  # the learned GQA expansion starts as the repeat
        eye = _expand_heads(torch.eye(v.shape[0], dtype=dtype), n_kv, rep)
        out[dst + "x_expand.weight"], out[dst + "B_expand.weight"] = eye, eye.clone()
    conv_dim = d_inner + 2 * config.mamba_n_groups * config.mamba_d_state
    conv = torch.zeros(conv_dim, 1, config.mamba_d_conv, dtype=dtype)
    conv[..., -1] = 1.0  # identity: the conv starts as a pass-through
    out[dst + "conv1d.weight"] = conv
    if config.mamba_conv_bias:
        out[dst + "conv1d.bias"] = torch.zeros(conv_dim, dtype=dtype)
    out.update({dst + name: t.to(dtype) for name, t in init_ssm_parameters(config, generator).items()})
    return out


def convert_state_dict(teacher_sd: dict, config: M1Config, seed: int = 0, progress: bool = True, gate: str = "open") -> dict:
    """Hybrid state dict from a Llama state dict. Pops every tensor it uses from `teacher_sd` and
    fails if any is left over (a key this mapping does not know)."""
    generator = torch.Generator().manual_seed(seed)
    kinds = config.layers_block_type
    out = {}
    for key in list(teacher_sd):
        m = _ATTN_KEY.match(key)
        if not (m and kinds[int(m[1])] == "mamba"):
            out[key] = teacher_sd.pop(key)  # copied exactly (shared storage, no copy)
    mamba_layers = [i for i, kind in enumerate(kinds) if kind == "mamba"]
    for i in tqdm(mamba_layers, desc="attention -> mamba", disable=not progress):
        out.update(_mixer_from_attention(i, teacher_sd, config, generator, gate))
    if teacher_sd:
        raise ValueError(f"Teacher tensors not consumed by the conversion (unexpected layout?): {sorted(teacher_sd)[:8]}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def convert_to_hybrid(teacher_model, attn_layers, layout="m1", xb_expansion="repeat", gate="open", seed=0,
                      share_weights=False, progress=True, **mixer_options) -> M1ForCausalLM:
    """An M1ForCausalLM initialised from `teacher_model` (a transformers LlamaForCausalLM).

    `share_weights=True` lets the hybrid reuse the teacher's tensors for copied parameters (no extra
    memory; the teacher must not be used afterwards); the default copies them.
    """
    config = convert_config(teacher_model.config, attn_layers, layout, xb_expansion, gate, **mixer_options)
    teacher_sd = dict(teacher_model.state_dict())
    if not share_weights:
        teacher_sd = {k: v.clone() for k, v in teacher_sd.items()}
    state_dict = convert_state_dict(teacher_sd, config, seed=seed, progress=progress, gate=gate)
    with torch.device("meta"):  # parameters come from the state dict: never allocate them twice
        model = M1ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # buffers are not in the state dict: made on the weights' device (a GPU teacher's hybrid must not keep a CPU
    # inv_freq, which a CUDA graph capture refuses to copy)
    device = next(iter(state_dict.values())).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.tie_weights()
    model.generation_config = teacher_model.generation_config
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"conversion left tensors uninitialised: {on_meta[:5]}")
    return model.eval()


def conversion_summary(teacher_model, hybrid: M1ForCausalLM) -> dict:
    """Kept layers, parameter counts, and state memory: Mamba state per sequence vs KV per token."""
    from .modeling import state_bytes_per_token

    c = hybrid.config
    teacher_kv = 2 * c.num_key_value_heads * c.head_dim * 2 * c.num_hidden_layers  # bf16 K and V, every layer
    return {
        "attention_layers": c.attn_layers,
        "mamba_layers": c.num_hidden_layers - len(c.attn_layers),
        "teacher_parameters": teacher_model.num_parameters(),
        "hybrid_parameters": hybrid.num_parameters(),
        "teacher_kv_bytes_per_token": teacher_kv,
        **state_bytes_per_token(c),
    }


CONVERSION_RECORD = "m1_conversion.json"  # how a hybrid directory was made (checked by Axolotl's m1_convert_from)


def conversion_record(teacher_dir, attn_layers, layout, xb_expansion, gate="open", d_state=None, seed=0) -> dict:
    return {"teacher": str(Path(teacher_dir).resolve()), "attn_layers": list(attn_layers), "layout": layout,
            "xb_expansion": xb_expansion, "gate": gate, "d_state": d_state, "seed": seed}


def convert_hybrid_dir(teacher_dir, out_dir, attn_layers=None, num_attn_layers=None, layout="m1", xb_expansion="repeat",
                       gate="open", d_state=None, dtype=torch.float32, seed=0, overwrite=False) -> dict:
    """Convert the checkpoint in `teacher_dir` and write the hybrid (+ tokenizer) to `out_dir` atomically.
    Returns `conversion_summary` plus the time taken."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .utils import atomic_output_dir, check_checkpoint, refuse_existing

    start = time.perf_counter()
    check_checkpoint(teacher_dir)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    if teacher_config.model_type == M1Config.model_type:
        raise ValueError(f"{teacher_dir} is already an M1 hybrid; pass the Transformer it came from as --teacher.")
    if (attn_layers is None) == (num_attn_layers is None):
        raise ValueError("Give exactly one of --attn-layers (e.g. 3,8,13,18,23,27) or --num-attn-layers N.")
    if attn_layers is None:
        attn_layers = spaced_attn_layers(teacher_config.num_hidden_layers, num_attn_layers)
    mixer_options = {} if d_state is None else {"mamba_d_state": d_state}
    # every refusal (model type, layers, sizes, existing output) before the weights are read
    convert_config(teacher_config, attn_layers, layout, xb_expansion, gate, **mixer_options)
    refuse_existing(out_dir, overwrite)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
    tokenizer = None
    if (Path(teacher_dir) / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    else:
        logger.warning("%s has no tokenizer; the hybrid is written without one (copy it over before training).", teacher_dir)
    hybrid = convert_to_hybrid(teacher, attn_layers, layout, xb_expansion, gate, seed=seed, share_weights=True,
                               **mixer_options)
    summary = conversion_summary(teacher, hybrid)
    del teacher
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        hybrid.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = conversion_record(teacher_dir, attn_layers, layout, xb_expansion, gate, d_state, seed)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=1))
    summary["seconds"] = time.perf_counter() - start
    logger.info("wrote the hybrid to %s", out_dir)
    return summary
