"""The Axolotl plugin in a real Axolotl (the axolotl environment): config validation, the tokenizer check, and
`axolotl train` end to end on a tiny hybrid with a tiny teacher, packed, on reasoning-gym conversations."""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("axolotl", reason="the Axolotl plugin is tested in the axolotl environment (.venvs/axolotl)")

import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from m1_plugins.axolotl.args import M1Args
from m1_plugins.axolotl.trainer import check_same_tokenizer
from m1_plugins.convert import convert_to_hybrid
from m1_plugins.data import reasoning_gym_conversations

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1",
               "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_args_validation(tmp_path):
    with pytest.raises(ValidationError, match="needs m1_teacher"):
        M1Args()
    with pytest.raises(ValidationError, match="not a checkpoint directory"):
        M1Args(m1_teacher=str(tmp_path))
    with pytest.raises(ValidationError, match="nothing to train"):
        M1Args(m1_kl_weight=0)
    with pytest.raises(ValidationError, match="m1_kl_direction"):
        M1Args(m1_kl_weight=0, m1_ce_weight=1, m1_kl_direction="sideways")
    assert M1Args(m1_kl_weight=0, m1_ce_weight=1.0).m1_teacher is None


def test_unknown_m1_key_is_refused_with_the_closest_one():
    from m1_plugins.axolotl import M1Plugin

    with pytest.raises(ValueError, match="unknown M1 plugin key 'm1_kl_wieght': did you mean m1_kl_weight\\?"):
        M1Plugin().register({"base_model": "x", "m1_kl_wieght": 1.0})
    with pytest.raises(ValueError, match="unknown M1 plugin key 'm1_zzz': valid keys: m1_align, m1_teacher"):
        M1Plugin().register({"m1_zzz": 1})


def test_tokenizer_mismatch_is_refused(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    check_same_tokenizer(str(smollm2_dir), tokenizer)
    tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(str(smollm2_dir), tokenizer)


@pytest.fixture(scope="module")
def tiny_pair(smollm2_dir, tmp_path_factory):
    """A tiny random Llama teacher with the real SmolLM2 tokenizer, its converted hybrid, and chat data."""
    root = tmp_path_factory.mktemp("axolotl")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=3, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    teacher = LlamaForCausalLM(config)
    hybrid = convert_to_hybrid(teacher, [1], layout="head-aligned")
    for model, name in ((teacher, "teacher"), (hybrid, "hybrid")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with (root / "data.jsonl").open("w") as f:
        for messages in reasoning_gym_conversations("basic_arithmetic", size=24, seed=0):
            f.write(json.dumps({"messages": messages}) + "\n")
    return root


def axolotl_train(root, name, **overrides):
    cfg = {
        "base_model": str(root / "hybrid"), "plugins": ["m1_plugins.axolotl.M1Plugin"], "m1_teacher": str(root / "teacher"),
        "datasets": [{"path": str(root / "data.jsonl"), "type": "chat_template", "field_messages": "messages",
                      "roles_to_train": ["assistant"]}],
        "chat_template": "tokenizer_default", "val_set_size": 0, "dataset_prepared_path": str(root / f"prepared-{name}"),
        "sequence_len": 256, "sample_packing": True, "pad_to_sequence_len": True, "attn_implementation": "sdpa",
        "micro_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-3,
        "optimizer": "adamw_torch", "lr_scheduler": "constant", "bf16": False, "fp16": False, "tf32": False,
        "flash_attention": False, "output_dir": str(root / name), "logging_steps": 1, "save_steps": 3, "seed": 0,
        **overrides,
    }
    (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(root / f"{name}.yml")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **OFFLINE_ENV})
    return proc, root / name


def training_logs(output_dir):
    """The logged training steps of the last checkpoint (loss, learning rate, ppl where logged...)."""
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"))
    assert states, f"no checkpoint written in {output_dir}"
    return [entry for entry in json.loads(states[-1].read_text())["log_history"] if "loss" in entry]


def logged_losses(output_dir):
    return [entry["loss"] for entry in training_logs(output_dir)]


def test_axolotl_distillation_and_sft_runs(tiny_pair):
    proc, out = axolotl_train(tiny_pair, "distill")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "m1 distillation: teacher" in log
    losses = logged_losses(out)
    assert len(losses) == 3 and all(0 < loss < 50 for loss in losses)  # KL of a random pair: positive, finite
    assert not any("ppl" in entry for entry in training_logs(out))  # exp(KL) is no perplexity
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "m1_hybrid"

    proc, out = axolotl_train(tiny_pair, "sft", m1_kl_weight=0.0, m1_ce_weight=1.0, m1_teacher=None)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "m1 distillation: teacher" not in log and "no teacher is loaded" in log
    assert len(logged_losses(out)) == 3
    assert all("ppl" in entry for entry in training_logs(out))  # Axolotl's own trainer: exp(CE) is the perplexity


def test_axolotl_refuses_bad_m1_keys(tiny_pair):
    proc, _ = axolotl_train(tiny_pair, "bad", m1_kl_direction="sideways")
    assert proc.returncode != 0 and "m1_kl_direction" in proc.stdout + proc.stderr


def test_interrupted_distillation_resumes_with_the_teacher(tiny_pair):
    """A run stopped after 2 steps (its checkpoint kept) is continued by the same command with a later max_steps:
    Axolotl resumes from the checkpoint, and our trainer re-attaches the teacher (the KL is still computed)."""
    proc, out = axolotl_train(tiny_pair, "resume", max_steps=2, save_steps=1, auto_resume_from_checkpoints=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    proc, out = axolotl_train(tiny_pair, "resume", max_steps=3, save_steps=1, auto_resume_from_checkpoints=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "m1 distillation: teacher" in log
    assert "resume from checkpoint at" in log and "checkpoint-2" in log
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]  # steps 1-2 come from the first run


def test_dataset_without_the_messages_field_fails_at_start_up(tiny_pair):
    """Axolotl's own chat_template loader names the key before any training step (we add nothing on top)."""
    bad = tiny_pair / "no_messages.jsonl"
    bad.write_text("".join(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n" for _ in range(8)))
    proc, out = axolotl_train(tiny_pair, "no-messages", datasets=[{"path": str(bad), "type": "chat_template",
                                                                   "field_messages": "messages"}])
    assert proc.returncode != 0 and "check `field_messages`" in proc.stdout + proc.stderr
    assert not list(out.glob("checkpoint-*"))


def test_convert_from_a_transformer_at_start_up(tiny_pair):
    """m1_convert_from: the run converts the teacher into base_model, distills from it (the default teacher), and a
    later start reuses the conversion only if it was made with the same settings."""
    import logging

    from m1_plugins.axolotl.convert_on_load import convert_on_load

    target = tiny_pair / "converted"
    proc, out = axolotl_train(tiny_pair, "convert-from", base_model=str(target), m1_teacher=None,
                              m1_convert_from=str(tiny_pair / "teacher"), m1_num_attn_layers=1, max_steps=2, save_steps=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "m1_convert_from: converting" in log and "m1 distillation: teacher" in log
    assert json.loads((target / "m1_conversion.json").read_text())["attn_layers"] == [2]
    assert len(logged_losses(out)) == 2
    cfg = {"base_model": str(target), "m1_convert_from": str(tiny_pair / "teacher"), "m1_num_attn_layers": 1}
    convert_on_load(cfg, logging.getLogger("test"))  # same settings: reused, no error
    with pytest.raises(ValueError, match="is not the conversion m1_convert_from asks for"):
        convert_on_load({**cfg, "m1_num_attn_layers": 2}, logging.getLogger("test"))
    with pytest.raises(ValueError, match="exactly one of m1_attn_layers"):
        convert_on_load({**cfg, "m1_attn_layers": [1]}, logging.getLogger("test"))


def test_axolotl_alignment_trains_only_the_mixers_and_logs_fidelity(tiny_pair):
    """m1_align: the mixers (only) learn to reproduce the teacher's attention layer they replaced: the norm scales are
    fitted before the first step, the per-layer error falls, every other weight stays the teacher's, and held-out
    fidelity is measured before training and every m1_fidelity_every steps."""
    from safetensors.torch import load_file

    proc, out = axolotl_train(tiny_pair, "align", m1_align=True, max_steps=4, save_steps=4, learning_rate=3e-3,
                              m1_fidelity_data=str(tiny_pair / "data.jsonl"), m1_fidelity_every=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "m1 alignment: teacher" in log and "gated-norm scales fitted" in log
    losses = logged_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] < 10
    assert not any("ppl" in entry for entry in training_logs(out))
    before, after = load_file(tiny_pair / "hybrid" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mamba." in k for k in changed), sorted(changed)
    assert "model.layers.0.mamba.norm.weight" in changed and "model.layers.0.mamba.in_proj.weight" in changed
    records = [json.loads(line) for line in (out / "m1_fidelity.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["tokens"] == 0 < records[1]["tokens"] < records[2]["tokens"]
    assert all(0 <= r["top1_agreement"] <= 1 and r["kl_student_teacher"] >= 0 for r in records)


def test_alignment_refuses_a_teacher_it_was_not_converted_from(tiny_pair, tmp_path):
    from m1_plugins.align import check_alignable

    from transformers import AutoConfig

    import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)

    teacher = json.loads((tiny_pair / "teacher" / "config.json").read_text())
    student_config = AutoConfig.from_pretrained(tiny_pair / "hybrid")
    teacher_config = AutoConfig.from_pretrained(tiny_pair / "teacher")
    check_alignable(teacher_config, student_config)
    teacher_config.hidden_size = 2 * teacher["hidden_size"]
    with pytest.raises(ValueError, match="differ in hidden_size"):
        check_alignable(teacher_config, student_config)
    with pytest.raises(ValueError, match="needs a converted M1 hybrid"):
        check_alignable(teacher_config, teacher_config)
    identity = convert_to_hybrid(LlamaForCausalLM(AutoConfig.from_pretrained(tiny_pair / "teacher")), [0, 1, 2])
    with pytest.raises(ValueError, match="no Mamba layers"):
        check_alignable(teacher_config, identity.config)


def test_alignment_of_a_model_that_is_not_a_hybrid_fails_before_loading(tiny_pair):
    proc, out = axolotl_train(tiny_pair, "align-teacher", m1_align=True, base_model=str(tiny_pair / "teacher"))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "attention alignment needs a converted M1 hybrid as base_model" in log
    assert "Loading weights" not in log and not out.exists()


def test_interrupted_alignment_resumes_without_refitting(tiny_pair):
    """A resumed alignment keeps its trained norm scales (no second fit) and its fidelity curve goes on from the
    checkpoint: no step measured twice, tokens counted on from the checkpoint's."""
    run = dict(m1_align=True, save_steps=1, auto_resume_from_checkpoints=True, m1_fidelity_every=1,
               m1_fidelity_data=str(tiny_pair / "data.jsonl"))
    proc, out = axolotl_train(tiny_pair, "align-resume", max_steps=2, **run)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    proc, out = axolotl_train(tiny_pair, "align-resume", max_steps=3, **run)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "checkpoint-2" in log and "gated-norm scales fitted" not in log
    records = [json.loads(line) for line in (out / "m1_fidelity.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[1]["tokens"] < records[2]["tokens"] < records[3]["tokens"]
