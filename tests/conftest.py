"""Shared fixtures: the real offline teacher, and tiny M1 models (CPU, reference kernels)."""

import pytest
import torch

from m1_plugins import M1Config


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real offline teacher written once per session as an HF checkpoint (about 30 s: GGUF dequantisation)."""
    from m1_plugins.teacher import write_teacher

    return write_teacher(tmp_path_factory.mktemp("teacher") / "smollm2")


# layouts of the Mamba-2 mixer exercised by the model tests; attention heads are 8 x head_dim 8
LAYOUTS = {
    # the paper's layout: SSM state 16, SSM heads of 16 channels, one B/C group per SSM head
    "m1": dict(mamba_d_state=16, mamba_head_dim=16),
    # head-aligned: SSM heads and groups are the attention heads (d_state = head_dim = 8, 8 groups)
    "head-aligned": dict(mamba_d_state=8, mamba_head_dim=8, mamba_n_groups=8),
    # the learned GQA expansion of x and B
    "m1-xb2": dict(mamba_d_state=16, mamba_head_dim=16, mamba_xb_expansion=2),
    # several SSM heads share one B/C group
    "grouped": dict(mamba_d_state=16, mamba_head_dim=8, mamba_n_groups=2),
}


def tiny_config(layout="m1", **overrides) -> M1Config:
    kwargs = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, attn_layers=[1], max_position_embeddings=256,
        mamba_chunk_size=8, mamba_d_conv=4, mamba_kernels="reference",
        # a larger init than 0.02 so that the Mamba and attention paths move the logits visibly
        initializer_range=0.1,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    kwargs.update(LAYOUTS[layout])
    kwargs.update(overrides)
    return M1Config(**kwargs)


@pytest.fixture
def make_config():
    """Factory: make_config(layout="m1", **overrides) -> a tiny M1Config."""
    return tiny_config


@pytest.fixture
def make_model():
    """Factory: make_model(layout="m1", dtype=torch.float32, **overrides) -> a seeded M1ForCausalLM in eval mode."""
    from m1_plugins import M1ForCausalLM

    def make(layout="m1", dtype=torch.float32, seed=0, **overrides):
        torch.manual_seed(seed)
        model = M1ForCausalLM(tiny_config(layout, **overrides)).to(dtype).eval()
        return model

    return make
