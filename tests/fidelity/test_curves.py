"""`m1 curves`: held-out fidelity of training runs drawn against tokens trained on."""

import json

import pytest
from click.testing import CliRunner

from m1_plugins.cli import main


def write_run(path, points):
    path.mkdir()
    with (path / "m1_fidelity.jsonl").open("w") as f:
        for step, (tokens, top1, kl) in enumerate(points):
            f.write(json.dumps({"step": 10 * step, "tokens": tokens, "top1_agreement": top1, "kl_student_teacher": kl,
                                "kl_teacher_student": 2 * kl, "scored_tokens": 100}) + "\n")


def test_curves_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "plain", [(0, 0.1, 9.0), (1000, 0.3, 4.0)])
    write_run(tmp_path / "aligned", [(0, 0.4, 2.0), (1000, 0.6, 1.0), (2000, 0.7, 0.5)])
    out = tmp_path / "plots" / "curves.png"
    result = CliRunner().invoke(main, ["curves", "--runs", str(tmp_path / "plain"), str(tmp_path / "aligned"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert "| plain | 10 | 1,000 | 0.100 -> 0.300 | 9.000 -> 4.000 | 18.000 -> 8.000 |" in table
    assert "| aligned | 20 | 2,000 | 0.400 -> 0.700 |" in table


def test_curves_refuses_a_run_without_a_fidelity_log(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["curves", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")])
    assert result.exit_code != 0 and "has no m1_fidelity.jsonl: train it with m1_fidelity_data" in result.output
