"""`m1 verl-best`: the checkpoint of a VeRL run with the best validation score (the paper's checkpoint selection).

VeRL keeps no "best" checkpoint itself. verl_configs/grpo_m1.yaml validates and saves every 5 steps (the same
steps) and logs every metric as JSON lines (`trainer.logger: [file]`); this command reads that log, scores each
validated step, and names (optionally links as `best`) the `global_step_N` directory to use.
"""

import json
import os
import re
import statistics
from pathlib import Path

import click

DEFAULT_METRIC = r"^val-core/.+/acc/mean@\d+$"  # accuracy per data source, averaged over sources


def validation_scores(log_path, metric: str = DEFAULT_METRIC) -> dict[int, float]:
    """step -> score from VeRL's file-logger JSON lines ({"step": N, "data": {...}}). `metric` is an exact key or a
    regular expression; several matching keys (one per data source) are averaged."""
    pattern = re.compile(metric if metric.startswith("^") else f"^{re.escape(metric)}$")
    scores = {}
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        values = [v for k, v in entry["data"].items() if pattern.match(k)]
        if values:
            scores[entry["step"]] = statistics.mean(values)
    if not scores:
        raise ValueError(f"no validation metric matching {metric!r} in {log_path}: validate during training "
                         "(trainer.test_freq > 0) with the file logger on (trainer.logger: [file]), or pass --metric.")
    return scores


def best_checkpoint(scores: dict[int, float], checkpoints_dir) -> tuple[int, float, Path]:
    """(step, score, directory) of the best-scoring validated step that has a checkpoint (ties: the earlier step)."""
    saved = {int(p.name.removeprefix("global_step_")): p for p in Path(checkpoints_dir).glob("global_step_*")
             if p.name.removeprefix("global_step_").isdigit()}
    candidates = [(score, -step) for step, score in scores.items() if step in saved]
    if not candidates:
        raise ValueError(f"none of the validated steps {sorted(scores)} has a checkpoint in {checkpoints_dir} "
                         f"(saved: {sorted(saved)}): save on the validation steps (trainer.save_freq = test_freq).")
    score, neg_step = max(candidates)
    return -neg_step, score, saved[-neg_step]


@click.command("verl-best")
@click.option("--log", "log_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="VeRL's file-logger JSON lines (VERL_FILE_LOGGER_PATH, default ./<project>/<experiment>.jsonl).")
@click.option("--checkpoints", "checkpoints_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="trainer.default_local_dir (holds global_step_N directories).")
@click.option("--metric", default=DEFAULT_METRIC, show_default=True,
              help="Exact metric key, or a regular expression starting with ^ (matches are averaged).")
@click.option("--link", is_flag=True, help="Point CHECKPOINTS/best at the chosen directory (replaced atomically).")
def verl_best_command(log_path, checkpoints_dir, metric, link):
    """Name the checkpoint of the step with the best validation score."""
    try:
        scores = validation_scores(log_path, metric)
        step, score, directory = best_checkpoint(scores, checkpoints_dir)
    except ValueError as err:
        raise click.ClickException(str(err))
    for s, value in sorted(scores.items()):
        click.echo(f"step {s:5d}  {value:.4f}{'  <- best' if s == step else ''}")
    if link:
        tmp = checkpoints_dir / f".best-{os.getpid()}"
        tmp.symlink_to(directory.name)
        tmp.replace(checkpoints_dir / "best")
    click.echo(f"best: step {step} ({score:.4f}) -> {directory}")
