"""Test-time scaling curves from `m1 eval` results (the M1 paper's Figures 3-4), tables and plots.

Three curves per model, all accuracies averaged over every problem of the results (all benchmarks pooled):
- accuracy vs number of samples k: pass@k and maj@k for k = 1, 2, 4, ... <= N;
- accuracy vs wall-clock budget: the same points at x = k * seconds per sample, where seconds per sample =
  mean generated tokens per sample / throughput (tokens/s). Throughput is the rate at which the model
  produces tokens at the batch size it would be served with (measured, or the eval's own tokens/s);
  a faster model buys more samples for the same time, which is where the hybrid gains;
- accuracy vs maximum generation length L: every response truncated to its first L tokens and graded
  again (the last box must open and close within L tokens; an unclosed box is wrong), pass@1 and maj@N.
Each curve is written as PNG + SVG and as the CSV + markdown table behind it (one row per point).
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .grading import EVAL_INSTALL
from .metrics import group_by_problem, majority_at_k, mean_ci, pass_at_k, powers_of_two
from .results import SAMPLES_FILE, SETTINGS_FILE, model_labels, read_records, read_timing

COLUMNS = ("model", "metric", "k", "x", "accuracy", "ci_low", "ci_high")


@dataclass
class ModelResults:
    """One model's eval output: label, settings of its run, records (complete problems), timing.json."""

    label: str
    settings: dict
    records: list[dict]
    timing: dict

    @property
    def measured_throughput(self) -> float:
        """Generated tokens per second of generation during the eval (all benchmarks)."""
        seconds = sum(self.timing["generation_seconds"].values())
        if seconds <= 0:
            raise ValueError(f"{self.label}: no generation time recorded; pass --throughput.")
        return sum(r["tokens"] for r in self.records) / seconds


def load_results(path: Path, name: str | None = None) -> list[ModelResults]:
    """The models under an `m1 eval --out` directory, or the one model of a directory OUT/LABEL. They are labelled
    by their directory names, or by `name`: NAME for the model of a one-model run, NAME/LABEL for each of several
    (two runs of one model directory need it)."""
    path = Path(path)
    if (path / SETTINGS_FILE).is_file():
        run_dir, labels = path, model_labels(json.loads((path / SETTINGS_FILE).read_text())["models"])
    elif (path / SAMPLES_FILE).is_file() and (path.parent / SETTINGS_FILE).is_file():
        run_dir, labels = path.parent, [path.name]
    else:
        raise ValueError(f"{path} is not an `m1 eval` output (no {SETTINGS_FILE}, nor {SAMPLES_FILE} under one).")
    settings = json.loads((run_dir / SETTINGS_FILE).read_text())
    results = []
    for label in labels:
        records = read_records(run_dir / label, settings["n"])
        if not records:
            raise ValueError(f"{run_dir / label} has no complete problems yet; run `m1 eval` first.")
        shown = label if name is None else name if len(labels) == 1 else f"{name}/{label}"
        results.append(ModelResults(shown, settings, records, read_timing(run_dir / label)))
    return results


def _row(model: str, metric: str, k: int, x: float, values: list[float]) -> dict:
    ci = mean_ci(values)
    return dict(model=model, metric=metric, k=k, x=x, accuracy=ci["mean"], ci_low=ci["low"], ci_high=ci["high"])


def samples_curve(result: ModelResults, repeats: int = 100, seed: int = 0) -> list[dict]:
    """pass@k and maj@k vs k (x = k)."""
    problems = list(group_by_problem(result.records).values())
    n = result.settings["n"]
    rows = []
    for k in powers_of_two(n):
        rows.append(_row(result.label, "pass@k", k, k, [pass_at_k(n, sum(r["correct"] for r in s), k) for s in problems]))
        rows.append(_row(result.label, "maj@k", k, k, [majority_at_k([r["answer"] for r in s], [r["correct"] for r in s], k,
                                                                     repeats, seed) for s in problems]))
    return rows


def budget_curve(samples_rows: list[dict], mean_tokens: float, throughput: float) -> list[dict]:
    """The samples curve with x = k * mean_tokens / throughput (seconds for k samples)."""
    if throughput <= 0:
        raise ValueError(f"throughput must be positive tokens/s, got {throughput}.")
    return [{**row, "x": row["k"] * mean_tokens / throughput} for row in samples_rows]


def truncated_grade(record: dict, length: int) -> tuple[str | None, bool]:
    """(answer, correct) of a sample record's response cut to its first `length` tokens."""
    opened = [box for box in record["boxes"] if box[0] <= length]
    if not opened:
        return None, False
    _, end, content, correct = opened[-1]
    return (content, correct) if end is not None and end <= length else (None, False)


def length_curve(result: ModelResults, lengths: list[int], repeats: int = 100, seed: int = 0) -> list[dict]:
    """pass@1 and maj@N vs maximum generation length (x = L tokens)."""
    problems = list(group_by_problem(result.records).values())
    n = result.settings["n"]
    rows = []
    for length in lengths:
        graded = [[truncated_grade(r, length) for r in s] for s in problems]
        rows.append(_row(result.label, "pass@1", 1, length, [sum(c for _, c in g) / n for g in graded]))
        rows.append(_row(result.label, f"maj@{n}", n, length, [majority_at_k([a for a, _ in g], [c for _, c in g], n, repeats, seed)
                                                               for g in graded]))
    return rows


def default_lengths(max_new_tokens: int, points: int = 8) -> list[int]:
    """max_new_tokens / 2^j for j < points (at least 1 token), ascending."""
    return sorted({max(1, max_new_tokens >> j) for j in range(points)})


def write_curve(rows: list[dict], stem: Path, xlabel: str, title: str, log_x: bool = True) -> None:
    """stem.png, stem.svg (one line per model x metric, 95% CI band) and stem.csv, stem.md (the rows)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"Plots need matplotlib. Install: {EVAL_INSTALL}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['model']} | {r['metric']} | {r['k']} | {r['x']:.4g} | {100 * r['accuracy']:.1f} | "
              f"{100 * r['ci_low']:.1f} | {100 * r['ci_high']:.1f} |" for r in rows]
    stem.with_suffix(".md").write_text(f"# {title}\n\naccuracy and 95% CI in %, x = {xlabel}\n\n" + "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for color, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, models):
        for style, metric in zip(("-o", "--s", ":^"), dict.fromkeys(r["metric"] for r in rows if r["model"] == model)):
            points = [r for r in rows if r["model"] == model and r["metric"] == metric]
            xs = [r["x"] for r in points]
            ax.plot(xs, [100 * r["accuracy"] for r in points], style, color=color, label=f"{model} {metric}")
            ax.fill_between(xs, [100 * r["ci_low"] for r in points], [100 * r["ci_high"] for r in points], color=color, alpha=0.12)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylim(0, max(1.0, 110 * max(r["ci_high"] for r in rows)))  # an all-zero curve still shows its axis
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=120)
    plt.close(fig)
