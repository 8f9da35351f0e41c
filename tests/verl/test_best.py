"""`m1 verl-best`: the checkpoint of the best validated step, from VeRL's file-logger JSON lines."""

import json

from click.testing import CliRunner

from m1_plugins.verl.best import best_checkpoint, validation_scores, verl_best_command

LOG = [  # what VeRL's FileLogger writes: training metrics every step, validation every test_freq steps
    {"step": 1, "data": {"actor/entropy": 0.9}},
    {"step": 5, "data": {"actor/entropy": 0.8, "val-core/math/acc/mean@32": 0.40, "val-core/aime/acc/mean@32": 0.10}},
    {"step": 10, "data": {"val-core/math/acc/mean@32": 0.50, "val-core/aime/acc/mean@32": 0.20}},
    {"step": 15, "data": {"val-core/math/acc/mean@32": 0.60, "val-core/aime/acc/mean@32": 0.10}},
    {"step": 20, "data": {"val-core/math/acc/mean@32": 0.70, "val-core/aime/acc/mean@32": 0.30}},
]


def run_dir(tmp_path, saved=(5, 10, 15, 20)):
    log = tmp_path / "grpo_m1.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in LOG))
    for step in saved:
        (tmp_path / "ckpt" / f"global_step_{step}").mkdir(parents=True)
    return log, tmp_path / "ckpt"


def test_best_is_the_mean_over_sources_and_needs_a_checkpoint(tmp_path):
    log, ckpt = run_dir(tmp_path, saved=(5, 10, 15))
    assert best_checkpoint(validation_scores(log), ckpt) == (10, 0.35, ckpt / "global_step_10")  # 15 ties at 0.35: the earlier step
    assert best_checkpoint(validation_scores(log, metric="val-core/math/acc/mean@32"), ckpt)[0] == 15  # step 20 has no checkpoint


def test_cli_links_best_and_explains_what_is_missing(tmp_path):
    log, ckpt = run_dir(tmp_path)
    result = CliRunner().invoke(verl_best_command, ["--log", str(log), "--checkpoints", str(ckpt), "--link"])
    assert result.exit_code == 0, result.output
    assert "step    20  0.5000  <- best" in result.output
    assert (ckpt / "best").resolve() == (ckpt / "global_step_20").resolve()
    bad = CliRunner().invoke(verl_best_command, ["--log", str(log), "--checkpoints", str(ckpt), "--metric", "val/x"])
    assert bad.exit_code != 0 and "test_freq" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = CliRunner().invoke(verl_best_command, ["--log", str(log), "--checkpoints", str(empty)])
    assert none.exit_code != 0 and "save_freq = test_freq" in none.output
