"""What the benchmarks share: the Llama-3.2-3B shape (and a tiny twin), the M1 mixer layouts, and the
hardware / version record every result carries."""

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Llama-3.2-3B
SHAPE_3B = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
ATTN_LAYERS_3B = [3, 8, 13, 18, 23, 27]
# a tiny shape with the same structure (3 attention heads of 32: mamba_xb_expansion=3 divides the SSM heads of
# both layouts, 6 x 16 and 3 x 32)
SHAPE_TINY = dict(
    vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=3,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
ATTN_LAYERS_TINY = [1]


def mixer_layout(name, shape):
    """The M1Config mamba_* fields of a model name."""
    if name.startswith("m1"):
        fields = dict(mamba_d_state=16, mamba_head_dim=16)  # n_groups defaults to one per SSM head
    elif name.startswith("aligned"):
        fields = dict(mamba_d_state=shape["head_dim"], mamba_head_dim=shape["head_dim"],
                      mamba_n_groups=shape["num_attention_heads"])
    else:
        raise ValueError(name)
    if name.endswith("-xb3"):
        fields["mamba_xb_expansion"] = 3
    return fields


def param_count(params: int) -> str:
    """A parameter count for a table: 3.213B, or 0.842M below a billion (a tiny model is not 0.000B)."""
    return f"{params / 1e9:.3f}B" if params >= 1e9 else f"{params / 1e6:.3f}M"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    try:
        from m1_plugins.ops._kernels import _import_mamba_ssm

        mamba_ssm = _import_mamba_ssm()
        out["mamba_ssm"] = mamba_ssm.__version__
        out["mamba_ssm_path"] = str(Path(mamba_ssm.__file__).parent)
    except Exception as err:  # noqa: BLE001
        out["mamba_ssm"] = None
        out["mamba_ssm_error"] = repr(err)
    try:
        import causal_conv1d

        out["causal_conv1d"] = causal_conv1d.__version__
    except Exception:  # noqa: BLE001
        out["causal_conv1d"] = None
    import m1_plugins

    out["m1_plugins"] = m1_plugins.__version__
    try:
        # "-dirty": the files differ from that commit (e.g. uncommitted work copied to a GPU machine)
        out["git_commit"] = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=REPO,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["git_commit"] = None
    return out


def hardware(device):
    out = {"device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=".".join(map(str, torch.cuda.get_device_capability())))
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except Exception:  # noqa: BLE001
            out["driver"] = None
    else:
        out["cpu"] = platform.processor() or platform.machine()
    return out
