"""`m1 data --teacher` and `m1 report` through click (tiny models over a byte-level tokenizer), and the report of
the real teacher against its all-attention conversion."""

import json

import pytest
from click.testing import CliRunner

from m1_plugins.cli import main

TASK = ["--task", "basic_arithmetic", "--size", "2"]


def m1(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """A refusal is one line from click (no traceback)."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def pair(tiny_model, save_model, tmp_path):
    """A tiny teacher, a student of the same weights (so every score is exact) and a different student."""
    teacher = tiny_model(seed=0, attn_layers=[0, 1, 2, 3])
    return {"teacher": save_model(teacher, tmp_path / "teacher"), "same": save_model(teacher, tmp_path / "same"),
            "other": save_model(tiny_model(seed=1), tmp_path / "other")}


def test_data_teacher(pair, tmp_path):
    out = tmp_path / "data" / "teacher.jsonl"
    args = ["data", "--teacher", pair["teacher"], "--task", "basic_arithmetic,chain_sum", "--size", 2, "--seed", 3,
            "--max-new-tokens", 4, "--device", "cpu", "--out", out]
    result = m1(*args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(list(line) == ["messages", "answer", "finished"] for line in lines)
    assert [m["role"] for m in lines[0]["messages"]] == ["user", "assistant"]
    assert lines[0]["messages"][0]["content"].endswith("within \\boxed{}.")
    assert not (tmp_path / "data" / "teacher.jsonl.partial").exists()
    assert json.loads((tmp_path / "data" / "teacher.jsonl.settings.json").read_text())["max_new_tokens"] == 4

    # an existing --out is refused before anything loads: here the "teacher" is an empty directory
    empty = tmp_path / "empty"
    empty.mkdir()
    before = out.read_text()
    line = error_line(m1("data", "--teacher", empty, *TASK, "--out", out))
    assert "already exists" in line and "--overwrite" in line and out.read_text() == before
    assert m1(*args, "--overwrite").exit_code == 0


def test_report_on_the_teachers_answers_with_a_cache(pair, tmp_path, monkeypatch):
    answers = tmp_path / "answers.jsonl"
    args = ["report", "--teacher", pair["teacher"], *TASK, "--max-new-tokens", 4, "--device", "cpu",
            "--answers", answers, "--out", tmp_path / "report.json"]
    result = m1(*args, "--student", pair["same"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["units"] == "nats/token" and report["max_length"] == 512 and report["conversations"] == 2
    assert report["kl_student_teacher"] == pytest.approx(0, abs=1e-6) and report["top1_agreement"] == 1.0
    on_answers = report["teacher_answers"]
    assert on_answers["kl_student_teacher"] == pytest.approx(0, abs=1e-6)
    assert on_answers["kl_teacher_student"] == pytest.approx(0, abs=1e-6)
    assert on_answers["top1_agreement"] == 1.0 and on_answers["same_answer"] == 1.0
    # 4 answer tokens + <|im_end|>\n each; more when random bytes decode to U+FFFD (3 bytes) and are re-encoded
    assert on_answers["tokens"] >= 2 * (4 + 2)
    assert set(on_answers["accuracy"]) == {"teacher", "student"} and on_answers["answers_file"] == str(answers)
    assert len(answers.read_text().splitlines()) == 2

    # a second report reads the teacher's answers from the cache instead of generating them
    import m1_plugins.teacher_data

    def no_generation(*args, **kwargs):
        raise AssertionError("the teacher's answers were generated again")

    monkeypatch.setattr(m1_plugins.teacher_data, "write_answers", no_generation)
    result = m1(*args, "--student", pair["other"])
    assert result.exit_code == 0, result.output
    other = json.loads((tmp_path / "report.json").read_text())["teacher_answers"]
    assert other["kl_student_teacher"] > 0.01 and other["tokens"] == on_answers["tokens"]

    # a cache of other settings is refused in one line, naming the difference
    line = error_line(m1(*args, "--student", pair["same"], "--max-new-tokens", 5))
    assert "other settings" in line and "max_new_tokens: 4 there, 5 now" in line


def test_report_refuses_another_vocabulary(pair, tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(pair["other"])
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(pair["other"])
    line = error_line(m1("report", "--teacher", pair["teacher"], "--student", pair["other"], *TASK, "--device", "cpu"))
    assert "different tokenizer" in line


def test_report_of_the_teacher_against_its_all_attention_conversion(smollm2_dir, tmp_path):
    """The identity conversion reproduces the teacher: no KL, the same next tokens and the same final answers."""
    from m1_plugins.convert import convert_hybrid_dir

    n_layers = json.loads((smollm2_dir / "config.json").read_text())["num_hidden_layers"]
    convert_hybrid_dir(smollm2_dir, tmp_path / "identity", attn_layers=list(range(n_layers)))
    result = m1("report", "--teacher", smollm2_dir, "--student", tmp_path / "identity", "--task", "basic_arithmetic",
                "--size", 4, "--max-new-tokens", 16, "--max-length", 256, "--device", "cpu",
                "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    on_answers = report["teacher_answers"]
    for scores in (report, on_answers):
        assert scores["kl_student_teacher"] < 1e-5 and scores["kl_teacher_student"] < 1e-5
        assert scores["top1_agreement"] == 1.0
    assert on_answers["same_answer"] == 1.0 and on_answers["conversations"] == 4
    assert on_answers["accuracy"]["student"] == on_answers["accuracy"]["teacher"]
