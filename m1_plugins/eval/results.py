"""The on-disk layout of an `m1 eval` run, its resume rules, and its summary table.

    OUT/settings.json           what was asked (models, benchmarks, sampling); a restart must match it
    OUT/summary.json, .md       every model x benchmark row (metrics.summarize + timing)
    OUT/LABEL/samples.jsonl     one record per sample (SAMPLE_FIELDS), appended a chunk of problems at a time
    OUT/LABEL/timing.json       {"wall_seconds": s, "generation_seconds": {benchmark: s}}, cumulative over restarts
    OUT/LABEL/summary.json      this model's rows

A sample record: benchmark, problem_id, sample (0..N-1), gold, response (decoded text), answer (last box
content or None), correct, tokens (generated, EOS included), finished (stopped with EOS rather than at
the length limit), boxes ([start_tokens, end_tokens or None, content or None, correct] per `\\boxed{`,
see grading.box_token_spans; used to re-grade responses truncated to fewer tokens).
"""

import json
import re
from pathlib import Path

from .metrics import group_by_problem

SAMPLE_FIELDS = ("benchmark", "problem_id", "sample", "gold", "response", "answer", "correct", "tokens", "finished", "boxes")
SETTINGS_FILE, SAMPLES_FILE, TIMING_FILE, SUMMARY_FILE = "settings.json", "samples.jsonl", "timing.json", "summary.json"


def split_name(spec: str) -> tuple[str | None, str]:
    """A `[NAME=]VALUE` argument (--benchmark NAME=SOURCE, --results NAME=DIR) as (NAME or None, VALUE); an
    existing path is never split, whatever its name."""
    named = re.fullmatch(r"([\w.-]+)=(.+)", spec)
    return named.groups() if named and not Path(spec).exists() else (None, spec)


def model_labels(model_dirs: list[str]) -> list[str]:
    """Subdirectory names of the models: the directory name, suffixed -2, -3... when names repeat."""
    labels = []
    for model_dir in model_dirs:
        name = Path(model_dir).name
        label, i = name, 1
        while label in labels:
            i += 1
            label = f"{name}-{i}"
        labels.append(label)
    return labels


def check_settings(out_dir: Path, settings: dict) -> None:
    """Write settings.json for a new run; for an existing one, refuse (ValueError) if any setting differs."""
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
        return
    old = json.loads(path.read_text())
    differences = [f"{key}: {old.get(key)!r} in the existing run, {settings.get(key)!r} now"
                   for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
    if differences:
        raise ValueError(f"{out_dir} holds a run with different settings, refusing to mix them:\n  " + "\n  ".join(differences)
                         + "\nResume with the original settings, or choose another --out.")


def read_records(model_dir: Path, n: int) -> list[dict]:
    """The records of problems that have all n samples. A torn last line or an incomplete problem (a crash
    mid-write) is dropped, and the file is rewritten without it, so those problems are generated again."""
    path = model_dir / SAMPLES_FILE
    if not path.exists():
        return []
    records, torn = [], False
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True
            break
    complete = [r for group in group_by_problem(records).values() if len(group) == n for r in group]
    if torn or len(complete) != len(records):
        path.write_text("".join(json.dumps(r) + "\n" for r in complete))
    return complete


def append_records(model_dir: Path, records: list[dict]) -> None:
    with open(model_dir / SAMPLES_FILE, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()


def read_timing(model_dir: Path) -> dict:
    path = model_dir / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {"wall_seconds": 0.0, "generation_seconds": {}}


def write_timing(model_dir: Path, timing: dict) -> None:
    (model_dir / TIMING_FILE).write_text(json.dumps(timing, indent=2))


def add_timing(rows: dict[str, dict], timing: dict) -> dict[str, dict]:
    """Rows of metrics.summarize plus generation_seconds and tokens_per_s (per benchmark and overall) and
    the model's wall_seconds (overall row: loading, generation and grading, summed over restarts)."""
    generation = timing["generation_seconds"]
    for name, row in rows.items():
        seconds = sum(generation.values()) if name == "overall" else generation.get(name, 0.0)
        row["generation_seconds"] = seconds
        row["tokens_per_s"] = row["tokens"] / seconds if seconds > 0 else None
    rows["overall"]["wall_seconds"] = timing["wall_seconds"]
    return rows


def _pct(value: dict | float, ci: bool = False) -> str:
    if isinstance(value, dict):
        return f"{100 * value['mean']:.1f} [{100 * value['low']:.1f}, {100 * value['high']:.1f}]" if ci else f"{100 * value['mean']:.1f}"
    return f"{100 * value:.1f}"


def markdown_table(summaries: dict[str, dict[str, dict]]) -> str:
    """One markdown row per model x benchmark (and overall). Accuracies in %, pass@1 with its 95% CI."""
    first = next(iter(next(iter(summaries.values())).values()))
    ks = sorted(int(key[5:]) for key in first if key.startswith("pass@"))
    header = ["model", "benchmark", "problems", "N", "pass@1 [95% CI]", *[f"pass@{k}" for k in ks[1:]],
              *[f"maj@{k}" for k in ks], "no box %", "cut %", "tokens", "mean len", "gen s", "tok/s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in summaries.items():
        for name, row in rows.items():
            cells = [label, name, row["problems"], row["n"], _pct(row["pass@1"], ci=True),
                     *[_pct(row[f"pass@{k}"]) for k in ks[1:]], *[_pct(row[f"maj@{k}"]) for k in ks],
                     _pct(row["no_box"]), _pct(row["cut"]), row["tokens"], f"{row['mean_tokens']:.1f}", f"{row['generation_seconds']:.1f}",
                     f"{row['tokens_per_s']:.1f}" if row["tokens_per_s"] else "", f"{row['wall_seconds']:.1f}" if "wall_seconds" in row else ""]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"
