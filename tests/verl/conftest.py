"""Fixtures of the VeRL adapter tests: a tiny random M1 hybrid saved the way VeRL loads a policy."""

import pytest
import torch


@pytest.fixture(scope="session")
def m1_dir(tmp_path_factory, smollm2_dir):
    """A tiny M1ForCausalLM (2 layers, one attention) over SmolLM2's vocabulary, saved with its tokenizer and chat
    template; max_position_embeddings 40960, room for both recipes' sequence lengths."""
    from transformers import AutoTokenizer

    from m1_plugins import M1Config, M1ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = M1Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_layers=[1], mamba_d_state=16, mamba_head_dim=16,
                      mamba_chunk_size=8, mamba_kernels="reference", max_position_embeddings=40960, initializer_range=0.1,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("m1") / "tiny"
    M1ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
