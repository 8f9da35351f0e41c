"""`m1 eval` + `m1 tts` end to end on a tiny random M1 model; resume and its refusals; import hygiene."""

import csv
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from m1_plugins.eval.cli import eval_command, tts_command
from m1_plugins.eval.results import SAMPLE_FIELDS, check_settings, read_records

BENCHMARK = "rg:basic_arithmetic,size=3,seed=0,min_terms=2,max_terms=2"


def run(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result


def eval_args(model_dir, out, n=2):
    return ["--model", model_dir, "--benchmark", BENCHMARK, "--n", n, "--max-new-tokens", 8, "--batch-size", 4,
            "--device", "cpu", "--repeats", 20, "--out", out]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_then_tts_end_to_end(tiny_model_dir, smollm2_tokenizer, tmp_path):
    out = tmp_path / "eval"
    result = run(eval_command, eval_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output

    settings = json.loads((out / "settings.json").read_text())
    assert (settings["n"], settings["temperature"], settings["max_new_tokens"], settings["benchmarks"]) == (2, 0.7, 8, [BENCHMARK])
    records = read_jsonl(out / "tiny" / "samples.jsonl")
    assert sorted((r["problem_id"], r["sample"]) for r in records) == [(p, s) for p in "012" for s in (0, 1)]
    for r in records:
        assert tuple(r) == SAMPLE_FIELDS
        assert 1 <= r["tokens"] <= 8 and (r["finished"] or r["tokens"] == 8)
        assert r["benchmark"] == "basic_arithmetic" and r["gold"].lstrip("-").isdigit()
        assert r["answer"] is None and r["correct"] is False and r["boxes"] == []  # a random model never boxes
    tokens = sum(r["tokens"] for r in records)

    summary = json.loads((out / "summary.json").read_text())["tiny"]
    overall = summary["overall"]
    assert (overall["problems"], overall["n"], overall["tokens"]) == (3, 2, tokens)
    assert overall["pass@1"] == overall["pass@2"] == overall["maj@2"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert overall["no_box"] == 1.0 and overall["cut"] == sum(not r["finished"] for r in records) / 6
    timing = json.loads((out / "tiny" / "timing.json").read_text())
    assert overall["generation_seconds"] == pytest.approx(timing["generation_seconds"]["basic_arithmetic"])
    assert overall["tokens_per_s"] == pytest.approx(tokens / overall["generation_seconds"])
    assert timing["wall_seconds"] >= overall["generation_seconds"] > 0
    assert summary["basic_arithmetic"]["tokens"] == tokens
    table = (out / "summary.md").read_text()
    assert "| tiny | overall | 3 | 2 | 0.0 [0.0, 0.0] | 0.0 | 0.0 | 0.0 | 100.0 |" in table
    assert "100.0% of samples have no \\boxed{} answer" in result.output

    # a restart with the same settings skips every finished problem
    before = (out / "tiny" / "samples.jsonl").read_text()
    again = run(eval_command, eval_args(tiny_model_dir, out))
    assert again.exit_code == 0, again.output
    assert (out / "tiny" / "samples.jsonl").read_text() == before
    assert json.loads((out / "tiny" / "timing.json").read_text())["generation_seconds"] == timing["generation_seconds"]

    # a restart with different settings is refused, naming what differs
    changed = run(eval_command, eval_args(tiny_model_dir, out, n=4))
    assert changed.exit_code != 0
    assert "n: 2 in the existing run, 4 now" in changed.output and "refusing to mix" in changed.output

    tts = tmp_path / "tts"
    result = run(tts_command, ["--results", out, "--throughput", 100, "--out", tts])
    assert result.exit_code == 0, result.output
    for stem in ("accuracy_vs_samples", "accuracy_vs_budget", "accuracy_vs_length"):
        assert (tts / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tts / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
        assert (tts / f"{stem}.md").read_text().count("| tiny |") == len(list(csv.DictReader(open(tts / f"{stem}.csv"))))
    samples = list(csv.DictReader(open(tts / "accuracy_vs_samples.csv")))
    assert [(r["metric"], r["k"], float(r["accuracy"])) for r in samples] == [
        ("pass@k", "1", 0.0), ("maj@k", "1", 0.0), ("pass@k", "2", 0.0), ("maj@k", "2", 0.0)]
    budget = list(csv.DictReader(open(tts / "accuracy_vs_budget.csv")))
    assert [float(r["x"]) for r in budget] == pytest.approx([k * tokens / 6 / 100 for k in (1, 1, 2, 2)])
    length = list(csv.DictReader(open(tts / "accuracy_vs_length.csv")))
    assert [(int(r["x"]), r["metric"]) for r in length] == [(L, m) for L in (1, 2, 4, 8) for m in ("pass@1", "maj@2")]
    assert f"tiny: 100.0 tok/s, mean length {tokens / 6:.1f} tokens" in result.output

    wrong = run(tts_command, ["--results", out, "--throughput", 100, "--throughput", 50, "--out", tts])
    assert wrong.exit_code != 0 and "got 2 throughputs for 1 models (tiny)" in wrong.output

    # two runs of one model directory: told apart by NAME=DIR (a whole run, or one model's directory)
    same = run(tts_command, ["--results", out, "--results", out / "tiny", "--out", tts])
    assert same.exit_code == 2 and same.output.strip().endswith(
        "models with the same name ['tiny', 'tiny']; name the runs: --results NAME=DIR.")
    labelled = run(tts_command, ["--results", f"a={out}", "--results", f"b={out / 'tiny'}", "--out", tts])
    assert labelled.exit_code == 0, labelled.output
    assert {r["model"] for r in csv.DictReader(open(tts / "accuracy_vs_samples.csv"))} == {"a", "b"}


def test_a_name_labels_the_models_of_a_run(tmp_path):
    from m1_plugins.eval.tts import load_results

    (tmp_path / "settings.json").write_text(json.dumps({"models": ["/m/teacher", "/m/hybrid"], "n": 1}))
    for model in ("teacher", "hybrid"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "samples.jsonl").write_text(json.dumps({"benchmark": "b", "problem_id": "0", "sample": 0}))
    assert [r.label for r in load_results(tmp_path)] == ["teacher", "hybrid"]
    assert [r.label for r in load_results(tmp_path, "t07")] == ["t07/teacher", "t07/hybrid"]
    assert [r.label for r in load_results(tmp_path / "hybrid", "t07")] == ["t07"]


def test_chat_prompt_uses_the_template_and_the_m1_suffix(smollm2_tokenizer):
    from m1_plugins.data import M1_PROMPT_SUFFIX
    from m1_plugins.eval.benchmarks import Problem, chat_prompt

    text = smollm2_tokenizer.decode(chat_prompt(smollm2_tokenizer, Problem("b", "0", "Calculate 2 + 3.", "5")))
    assert f"<|im_start|>user\nCalculate 2 + 3.\n{M1_PROMPT_SUFFIX}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_check_settings_refuses_every_changed_setting(tmp_path):
    settings = {"models": ["/m/a"], "benchmarks": ["rg:x"], "n": 4, "temperature": 0.7, "max_new_tokens": 64}
    check_settings(tmp_path, settings)
    check_settings(tmp_path, dict(settings))  # same settings: resume
    changed = {**settings, "models": ["/m/b"], "temperature": 1.0, "max_new_tokens": 32, "benchmarks": ["rg:y"]}
    with pytest.raises(ValueError) as err:
        check_settings(tmp_path, changed)
    for line in ("benchmarks: ['rg:x'] in the existing run, ['rg:y'] now", "max_new_tokens: 64 in the existing run, 32 now",
                 "models: ['/m/a'] in the existing run, ['/m/b'] now", "temperature: 0.7 in the existing run, 1.0 now"):
        assert line in str(err.value)
    assert "n:" not in str(err.value)


def test_read_records_drops_a_torn_line_and_incomplete_problems(tmp_path):
    rows = [{"benchmark": "b", "problem_id": p, "sample": s} for p, s in [("0", 0), ("0", 1), ("1", 0)]]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"benchmark": "b", "probl')
    assert read_records(tmp_path, n=2) == rows[:2]
    assert read_jsonl(tmp_path / "samples.jsonl") == rows[:2]  # rewritten: problem 1 will be generated again


def test_import_is_framework_free():
    code = ("import sys, m1_plugins.eval, m1_plugins.eval.cli, m1_plugins.eval.tts\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('axolotl', 'verl', 'vllm')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
