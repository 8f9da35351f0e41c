"""`m1 curves`: the held-out fidelity of training runs against the tokens they trained on, from the
m1_fidelity.jsonl that the Axolotl plugin writes into each run's output_dir (`m1_fidelity_data`)."""

import json
from pathlib import Path

import click

from .fidelity import FIDELITY_LOG
from .eval.grading import EVAL_INSTALL


def read_run(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FIDELITY_LOG
    if not path.is_file():
        raise click.BadParameter(f"{run_dir} has no {FIDELITY_LOG}: train it with m1_fidelity_data set.", param_hint="--runs")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | steps | tokens trained on | top-1 agreement | reverse KL (nats/token) | forward KL (nats/token) |",
             "|---|---|---|---|---|---|"]
    for name, records in runs.items():
        first, last = records[0], records[-1]
        lines.append(f"| {name} | {last['step']} | {last['tokens']:,} | {first['top1_agreement']:.3f} -> "
                     f"{last['top1_agreement']:.3f} | {first['kl_student_teacher']:.3f} -> {last['kl_student_teacher']:.3f} | "
                     f"{first['kl_teacher_student']:.3f} -> {last['kl_teacher_student']:.3f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"Plots need matplotlib. Install: {EVAL_INSTALL}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top1, kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        tokens = [r["tokens"] / 1e6 for r in records]
        top1.plot(tokens, [100 * r["top1_agreement"] for r in records], "-o", markersize=3, label=name)
        kl.plot(tokens, [r["kl_student_teacher"] for r in records], "-o", markersize=3, label=name)
    top1.set(xlabel="tokens trained on (millions)", ylabel="top-1 agreement with the teacher (%)", ylim=(0, 100))
    kl.set(xlabel="tokens trained on (millions)", ylabel="KL(student || teacher), nats/token", yscale="log")
    for ax in (top1, kl):
        ax.grid(alpha=0.3)
    top1.legend(fontsize=8)
    fig.suptitle("held-out fidelity on the teacher's own answers")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@click.command("curves")
@click.option("--runs", "run_dirs", multiple=True, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Output directories of training runs (repeat, or give several after one --runs).")
@click.argument("more_runs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write (a .md table beside it).")
def curves_command(run_dirs, more_runs, out):
    """Draw held-out fidelity (top-1 agreement and reverse KL on the teacher's answers) against tokens trained on,
    one line per run, from each run's m1_fidelity.jsonl; print and write the first and last points as a table."""
    runs = {Path(d).name: read_run(d) for d in (*run_dirs, *more_runs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    out.with_suffix(".md").write_text(table + "\n")
    plot(runs, out)
    click.echo(table)
    click.echo(f"wrote {out}")
