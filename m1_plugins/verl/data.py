"""`m1 verl-data`: math problems as VeRL's RL parquet (the layout `verl.utils.dataset.rl_dataset.RLHFDataset` reads).

One row per problem:

    data_source   the benchmark name (VeRL groups validation metrics by it)
    prompt        [{"role": "user", "content": problem + "\\n" + M1_PROMPT_SUFFIX}]; the rollout applies the
                  model's chat template with the generation prompt
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": answer}, read by m1_plugins.verl.reward.compute_score
    extra_info    {"split", "index" (row number, unique in the file), "problem_id"}

Sources are the SPECs of `m1 eval` (m1_plugins/eval/benchmarks.py): local MATH-style .jsonl/.json/.parquet
files and reasoning-gym tasks (`rg:TASK,size=N,seed=S`). A problem without a question or an answer is refused
there, naming the file and row.
"""

from pathlib import Path

import click

from ..data import M1_PROMPT_SUFFIX


def verl_rows(problems, split: str, ability: str = "math") -> list[dict]:
    """VeRL RL rows of `problems` (`m1_plugins.eval.benchmarks.Problem`s), indexed in order."""
    return [{"data_source": p.benchmark,
             "prompt": [{"role": "user", "content": f"{p.problem}\n{M1_PROMPT_SUFFIX}"}],
             "ability": ability,
             "reward_model": {"style": "rule", "ground_truth": p.answer},
             "extra_info": {"split": split, "index": i, "problem_id": p.problem_id}}
            for i, p in enumerate(problems)]


def write_parquet(rows: list[dict], out: Path) -> None:
    """Write rows next to `out` and move the file into place when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out)


@click.command("verl-data")
@click.option("--benchmark", "benchmarks", multiple=True, required=True,
              help="[NAME=]FILE.jsonl|.json|.parquet (MATH-style: problem/question + answer, or a solution with "
                   "\\boxed{}) or rg:TASK[,size=N,seed=S,KEY=VALUE...] (reasoning-gym); repeat to concatenate.")
@click.option("--split", default="train", show_default=True, help="Written into extra_info.split.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Parquet file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def verl_data_command(benchmarks, split, out, overwrite):
    """Write math problems as VeRL's RL parquet (data.train_files / data.val_files of a VeRL config): a chat
    prompt ending with the M1 prompt suffix, and the answer as reward_model.ground_truth for the
    m1_plugins.verl.reward reward."""
    from ..eval.cli import _load_benchmarks
    from ..utils import refuse_existing

    try:
        refuse_existing(out, overwrite)
    except FileExistsError as err:
        raise click.ClickException(str(err))
    if out.suffix != ".parquet":
        raise click.BadParameter(f"VeRL reads .parquet files; got {out.name!r}.", param_hint="--out")
    problems = _load_benchmarks(benchmarks)
    write_parquet(verl_rows(problems, split), out)
    counts = ", ".join(f"{name}: {sum(p.benchmark == name for p in problems)}"
                       for name in dict.fromkeys(p.benchmark for p in problems))
    click.echo(f"wrote {len(problems)} {split} problems ({counts}) to {out}")
