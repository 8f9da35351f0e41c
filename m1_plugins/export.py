"""M1 checkpoints <-> transformers' GraniteMoeHybridForCausalLM layout, which vLLM serves natively.

M1's Mamba mixer keeps the parameter layout of GraniteMoeHybrid's Mamba layer (design.md, decision 1), so
its tensors and the attention, norm and embedding tensors keep their names. Only the MLP changes shape:
Llama's gate_proj / up_proj / down_proj are GraniteMoeHybrid's shared_mlp.input_linear (gate rows, then up
rows) / shared_mlp.output_linear. The config is dense (`num_local_experts: 0`) with every multiplier 1 and
`attention_multiplier = head_dim**-0.5` (Llama's attention scaling).

Gated-norm grouping: M1, vLLM's MambaMixer2 (`Mixer2RMSNormGated`) and mamba-ssm's fused training kernel
normalise the gated RMSNorm per group of d_inner / n_groups channels. transformers' own
`GraniteMoeHybridRMSNormGated` (read in 5.10.4 and 5.20.1; CPU and CUDA inference paths) normalises over all
of d_inner, which agrees only when `mamba_n_groups == 1`, and every M1 layout has more groups. The exported
checkpoint is therefore exact for vLLM; in transformers, `group_gated_norms(model)` (or importing
`m1_plugins.granite_grouped_norm` before loading) makes the model compute what vLLM and M1 compute.
"""

import json
import logging
import math
import re
from pathlib import Path

import click
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    GraniteMoeHybridMambaLayer,
)

from .modeling import M1Config
from .modeling.modeling_m1 import M1RMSNormGated
from .ops import resolve_backend
from .utils import atomic_output_dir, refuse_existing

logger = logging.getLogger(__name__)

GRANITE = "granitemoehybrid"
EXPORT_TARGETS = (GRANITE,)
# Tensors named alike in both layouts (the mixer, attention, norms, embeddings).
_SHARED_KEY = re.compile(
    r"(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(weight|bias)"
    r"|model\.layers\.\d+\.mamba\.(in_proj\.(weight|bias)|conv1d\.(weight|bias)|dt_bias|A_log|D|norm\.weight"
    r"|out_proj\.(weight|bias)))$"
)
# transformers 5.20 renames the layer types "mamba" / "attention" (M1's names, those of the Granite-4.0-H
# checkpoints, and those transformers 5.10 and vLLM read) to these when it loads a config
_ATTENTION_TYPES = ("attention", "full_attention")


# ---------------------------------------------------------------- M1 -> GraniteMoeHybrid

def unsupported_for_granite(config: M1Config, fold_expansion: bool = False) -> list[str]:
    """Reasons (each with its fix) why `config` cannot be written in the GraniteMoeHybrid layout; [] if it can."""
    c, problems = config, []
    if c.mamba_xb_expansion > 1 and not fold_expansion:
        problems.append(
            f"x and B come from the learned GQA expansion (mamba_xb_expansion={c.mamba_xb_expansion}), which "
            "GraniteMoeHybrid's in_proj cannot express: pass --fold-expansion (fold_expansion=True) to multiply "
            "x_expand / B_expand into in_proj (exact up to float rounding; in_proj grows to full width)."
        )
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(
            f"head_dim={c.head_dim} but GraniteMoeHybrid (vLLM and transformers) derives head_dim = hidden_size / "
            f"num_attention_heads = {c.hidden_size // c.num_attention_heads}; such a model cannot be exported."
        )
    if c.mlp_bias:
        problems.append("mlp_bias=True, but GraniteMoeHybrid's MLP has no biases; such a model cannot be exported.")
    if c.hidden_act != "silu":
        problems.append(
            f"hidden_act={c.hidden_act!r}: GraniteMoeHybrid applies hidden_act to both the MLP and the Mamba "
            "convolution, while M1's convolution is always silu; only silu models can be exported."
        )
    if tuple(c.mamba_dt_limit) != (0.0, math.inf):
        problems.append(
            f"mamba_dt_limit={tuple(c.mamba_dt_limit)}: vLLM's Mamba-2 mixer ignores time_step_limit (it always "
            "uses (0, inf)), so the served model would differ; only the default (0, inf) can be exported."
        )
    return problems


def granite_config(config: M1Config, fold_expansion: bool = False) -> dict:
    """config.json of the GraniteMoeHybridForCausalLM equivalent to `config` (raises if there is none)."""
    problems = unsupported_for_granite(config, fold_expansion)
    if problems:
        raise ValueError("This M1 checkpoint cannot be exported to GraniteMoeHybrid:\n- " + "\n- ".join(problems))
    c, fields = config, config.to_dict()
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": GRANITE,
        "dtype": fields.get("dtype"),
        **{k: fields[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
            "attention_bias", "attention_dropout",
        )},
        # dense: the Llama MLP is the "shared" MLP, and there are no experts
        "shared_intermediate_size": c.intermediate_size,
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "attention_multiplier": c.head_dim ** -0.5,
        "position_embedding_type": "rope",
        "layer_types": c.layers_block_type,  # "mamba" / "attention"
        "mamba_n_heads": c.mamba_n_heads,
        "mamba_n_groups": c.mamba_n_groups,
        "mamba_d_state": c.mamba_d_state,
        "mamba_d_head": c.mamba_head_dim,
        "mamba_d_conv": c.mamba_d_conv,
        "mamba_expand": c.mamba_expand,
        "mamba_chunk_size": c.mamba_chunk_size,
        "mamba_conv_bias": c.mamba_conv_bias,
        "mamba_proj_bias": c.mamba_proj_bias,
    }


def fold_xb_expansion(state_dict: dict, config: M1Config) -> dict:
    """Multiply each mixer's x_expand / B_expand into the x and B rows of its in_proj (weight and bias), so
    that in_proj emits full-width x and B: the layout of a model with mamba_xb_expansion=1. In place."""
    r, bc_dim = config.mamba_xb_expansion, config.mamba_n_groups * config.mamba_d_state
    rows_of = [config.mamba_d_inner, config.mamba_d_inner // r, bc_dim // r, bc_dim + config.mamba_n_heads]  # z|x|B|C,dt
    for i, kind in enumerate(config.layers_block_type):
        if kind != "mamba":
            continue
        p = f"model.layers.{i}.mamba."
        x_expand, b_expand = state_dict.pop(p + "x_expand.weight"), state_dict.pop(p + "B_expand.weight")
        for key in (p + "in_proj.weight", p + "in_proj.bias"):
            if key not in state_dict:
                continue
            z, x, b, rest = state_dict[key].split(rows_of)
            # float64 so that the folded rows are the correctly rounded products
            x, b = ((e.double() @ w.double()).to(w.dtype) for e, w in ((x_expand, x), (b_expand, b)))
            state_dict[key] = torch.cat([z, x, b, rest])
    return state_dict


def granite_state_dict(state_dict: dict, config: M1Config) -> dict:
    """GraniteMoeHybrid tensors from M1 tensors (x and B at full width: fold the expansion first). Consumes
    `state_dict`; fails on a tensor this mapping does not know."""
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        gate, up, down = (state_dict.pop(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        out[p + "shared_mlp.input_linear.weight"] = torch.cat([gate, up])
        out[p + "shared_mlp.output_linear.weight"] = down
    return _with_shared_tensors(out, state_dict, config, "the GraniteMoeHybrid layout")


def _with_shared_tensors(out: dict, state_dict: dict, config, target: str) -> dict:
    """Move the tensors both layouts name alike (embeddings, norms, attention) from `state_dict` into `out`;
    anything else left over has no place in `target`."""
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # tied: both loaders take it from the embedding
    unknown = [k for k in state_dict if not _SHARED_KEY.match(k)]
    if unknown:
        raise ValueError(f"Tensors {target} has no place for: {sorted(unknown)[:8]}")
    out.update(state_dict)
    state_dict.clear()
    return out


# ---------------------------------------------------------------- GraniteMoeHybrid -> M1

def unsupported_for_m1(config: GraniteMoeHybridConfig) -> list[str]:
    """Reasons why a GraniteMoeHybrid config is not an M1 model (experts, multipliers, no RoPE); [] if it is."""
    c, problems = config, []
    head_dim = c.hidden_size // c.num_attention_heads
    if c.num_local_experts:
        problems.append(f"num_local_experts={c.num_local_experts}: M1 layers have one dense MLP, no experts.")
    multipliers = {"embedding_multiplier": c.embedding_multiplier, "residual_multiplier": c.residual_multiplier,
                   "logits_scaling": c.logits_scaling}
    problems += [f"{name}={value}: M1 has no such multiplier (needs 1)." for name, value in multipliers.items()
                 if value != 1]
    if not math.isclose(c.attention_multiplier, head_dim ** -0.5, rel_tol=1e-6):
        problems.append(
            f"attention_multiplier={c.attention_multiplier}: M1 scales attention by head_dim**-0.5 = {head_dim ** -0.5}."
        )
    if c.position_embedding_type != "rope":
        problems.append(f"position_embedding_type={c.position_embedding_type!r}: M1's attention uses RoPE.")
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act!r}: M1's Mamba convolution is always silu.")
    return problems


def m1_config_from_granite(config: GraniteMoeHybridConfig, dtype=None) -> M1Config:
    """The M1Config of a GraniteMoeHybrid config that M1 can express (raises otherwise). Initialisation-only
    fields (dt init range) and run-time settings (kernels, state dtype) take M1's defaults."""
    problems = unsupported_for_m1(config)
    if problems:
        raise ValueError("This GraniteMoeHybrid checkpoint is not expressible as M1:\n- " + "\n- ".join(problems))
    c = config
    return M1Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.shared_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps, use_cache=c.use_cache,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters),
        attention_bias=c.attention_bias, attention_dropout=c.attention_dropout,
        attn_layers=[i for i, kind in enumerate(c.layer_types) if kind in _ATTENTION_TYPES],
        mamba_d_state=c.mamba_d_state, mamba_head_dim=c.mamba_d_head, mamba_n_groups=c.mamba_n_groups,
        mamba_expand=c.mamba_expand, mamba_d_conv=c.mamba_d_conv, mamba_chunk_size=c.mamba_chunk_size,
        mamba_conv_bias=c.mamba_conv_bias, mamba_proj_bias=c.mamba_proj_bias,
        mamba_dt_limit=tuple(c.time_step_limit or (0.0, math.inf)), architectures=["M1ForCausalLM"], dtype=dtype,
    )


def m1_state_dict(state_dict: dict, config: M1Config) -> dict:
    """M1 tensors from GraniteMoeHybrid tensors: the inverse of `granite_state_dict`. Consumes `state_dict`."""
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        gate, up = state_dict.pop(p + "shared_mlp.input_linear.weight").chunk(2)
        # clones: views of one tensor would be saved as one shared tensor
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[p + "mlp.down_proj.weight"] = state_dict.pop(p + "shared_mlp.output_linear.weight")
    return _with_shared_tensors(out, state_dict, config, "an M1 model")


# ---------------------------------------------------------------- directories

def _model_type(model_dir: Path) -> str | None:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a checkpoint directory (save_pretrained's).")
    return json.loads(config_file.read_text()).get("model_type")


def _load_safetensors(model_dir: Path) -> dict:
    index = model_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not (model_dir / files[0]).is_file():
        raise FileNotFoundError(
            f"{model_dir} has no safetensors weights (model.safetensors or its index); re-save it with save_pretrained."
        )
    state_dict = {}
    for name in files:
        state_dict.update(load_file(model_dir / name))
    return state_dict


def _write_checkpoint(tmp: Path, src: Path, state_dict: dict) -> None:
    """Weights (sharded like save_pretrained) plus the source's tokenizer and generation config."""
    save_torch_state_dict(state_dict, tmp, metadata={"format": "pt"})
    if (src / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    else:
        logger.warning("%s has no tokenizer; the output is written without one (copy it over before serving).", src)
    if (src / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src).save_pretrained(tmp)


def export_to_granite(in_dir, out_dir, fold_expansion: bool = False, overwrite: bool = False) -> dict:
    """Write the M1 checkpoint in `in_dir` as a GraniteMoeHybridForCausalLM checkpoint in `out_dir` (atomically).
    Returns the written config."""
    in_dir = Path(in_dir)
    model_type = _model_type(in_dir)
    if model_type != M1Config.model_type:
        hint = "it is already in that layout" if model_type == GRANITE else "convert a Llama checkpoint (`m1 convert`) first"
        raise ValueError(f"{in_dir} is model_type={model_type!r}, not an M1 checkpoint: {hint}.")
    config = M1Config.from_pretrained(in_dir)
    granite = granite_config(config, fold_expansion)  # refuses before any weight is read
    refuse_existing(out_dir, overwrite)
    state_dict = _load_safetensors(in_dir)
    if config.mamba_xb_expansion > 1:
        fold_xb_expansion(state_dict, config)
    state_dict = granite_state_dict(state_dict, config)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_checkpoint(tmp, in_dir, state_dict)
        (tmp / "config.json").write_text(json.dumps(granite, indent=2, sort_keys=True) + "\n")
    if config.mamba_n_groups > 1:
        logger.warning(
            "mamba_n_groups=%d: vLLM computes this model exactly, but transformers' GraniteMoeHybridForCausalLM "
            "normalises the gated RMSNorm over all channels instead of per group; in transformers, load it after "
            "`import m1_plugins.granite_grouped_norm` (or call m1_plugins.export.group_gated_norms(model)).",
            config.mamba_n_groups,
        )
    return granite


def import_from_granite(in_dir, out_dir, overwrite: bool = False) -> M1Config:
    """Write the GraniteMoeHybrid checkpoint in `in_dir` (e.g. from `export_to_granite`) as an M1 checkpoint."""
    in_dir = Path(in_dir)
    model_type = _model_type(in_dir)
    if model_type != GRANITE:
        hint = "it is already an M1 checkpoint" if model_type == M1Config.model_type else "only these can be imported"
        raise ValueError(f"{in_dir} is model_type={model_type!r}, not {GRANITE!r}: {hint}.")
    granite = AutoConfig.from_pretrained(in_dir)
    config = m1_config_from_granite(granite, dtype=granite.to_dict().get("dtype"))
    refuse_existing(out_dir, overwrite)
    state_dict = m1_state_dict(_load_safetensors(in_dir), config)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_checkpoint(tmp, in_dir, state_dict)
        config.save_pretrained(tmp)
    return config


# ---------------------------------------------------------------- transformers' class, grouped like vLLM

class GroupedGatedRMSNorm(M1RMSNormGated):
    """Drop-in for transformers' GraniteMoeHybridRMSNormGated that normalises per group of d_inner / n_groups
    channels, as vLLM's Mixer2RMSNormGated, mamba-ssm's fused kernel and M1 do."""

    def forward(self, hidden_states, gate=None):
        return super().forward(hidden_states, gate, backend=resolve_backend("auto", hidden_states.device))


def group_gated_norms(model) -> int:
    """Make a transformers GraniteMoeHybrid model normalise its Mamba layers' gated RMSNorm per group (in place,
    sharing the norm weights). Returns the number of layers changed."""
    changed = 0
    for layer in model.modules():
        if isinstance(layer, GraniteMoeHybridMambaLayer) and not isinstance(layer.norm, GroupedGatedRMSNorm):
            norm = GroupedGatedRMSNorm(layer.intermediate_size, layer.intermediate_size // layer.n_groups,
                                       eps=layer.norm.variance_epsilon)
            norm.weight = layer.norm.weight
            layer.norm = norm
            changed += 1
    return changed


class GroupedNormGraniteMoeHybridForCausalLM(GraniteMoeHybridForCausalLM):
    """transformers' GraniteMoeHybridForCausalLM with the gated RMSNorm grouped as vLLM groups it."""

    def __init__(self, config):
        super().__init__(config)
        group_gated_norms(self)


# save_pretrained records the class name as the architecture: keep the one vLLM serves.
GroupedNormGraniteMoeHybridForCausalLM.__name__ = GraniteMoeHybridForCausalLM.__name__


def register_grouped_granite() -> None:
    """Make AutoModelForCausalLM load GraniteMoeHybrid checkpoints as GroupedNormGraniteMoeHybridForCausalLM.
    Identical to the stock class when mamba_n_groups == 1."""
    AutoModelForCausalLM.register(GraniteMoeHybridConfig, GroupedNormGraniteMoeHybridForCausalLM, exist_ok=True)


# ---------------------------------------------------------------- command line

@click.command("export")
@click.argument("in_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(EXPORT_TARGETS), default=GRANITE, show_default=True,
              help="Target layout: transformers' GraniteMoeHybridForCausalLM, served natively by vLLM.")
@click.option("--fold-expansion", is_flag=True,
              help="Multiply a learned GQA expansion (mamba_xb_expansion > 1) into in_proj; required for such models.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def export_command(in_dir, out_dir, target, fold_expansion, overwrite):
    """Write the M1 checkpoint IN_DIR as a GraniteMoeHybridForCausalLM checkpoint in OUT_DIR (weights, config,
    tokenizer), e.g. for `vllm serve OUT_DIR`. Nothing is written unless the export is complete."""
    granite = export_to_granite(in_dir, out_dir, fold_expansion=fold_expansion, overwrite=overwrite)
    kinds = granite["layer_types"]
    click.echo(f"wrote {out_dir} ({target}: {kinds.count('mamba')} Mamba-2 + {kinds.count('attention')} attention layers, "
               f"mamba_n_groups={granite['mamba_n_groups']})")


@click.command("import")
@click.argument("in_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def import_command(in_dir, out_dir, overwrite):
    """Write the GraniteMoeHybridForCausalLM checkpoint IN_DIR (e.g. from `m1 export`) as an M1 checkpoint in OUT_DIR."""
    config = import_from_granite(in_dir, out_dir, overwrite=overwrite)
    click.echo(f"wrote {out_dir} (M1: attention layers {config.attn_layers or 'none'})")
