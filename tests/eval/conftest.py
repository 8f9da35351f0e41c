"""Fixtures of the eval tests: a tiny random M1 model saved with the real SmolLM2 tokenizer and chat template."""

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random M1ForCausalLM (2 layers, 1 attention) over SmolLM2's vocabulary, saved with its tokenizer."""
    from m1_plugins import M1Config, M1ForCausalLM

    tok = smollm2_tokenizer
    config = M1Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_layers=[1], mamba_d_state=16,
                      mamba_head_dim=16, mamba_chunk_size=8, mamba_kernels="reference", max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = M1ForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_m1") / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
