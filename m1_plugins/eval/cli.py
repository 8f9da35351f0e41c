"""`m1 eval` and `m1 tts`: click commands, attached to the `m1` group in m1_plugins/cli.py."""

import json
import time
from pathlib import Path

import click

DTYPES = ("float32", "bfloat16", "float16")


@click.command("eval")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="HF checkpoint directory (with tokenizer and chat template); repeat for several models.")
@click.option("--benchmark", "benchmarks", multiple=True, required=True,
              help="[NAME=]FILE.jsonl|.json|.parquet (MATH500, AIME, AMC, OlympiadBench layouts) or "
                   "rg:TASK[,size=N,seed=S,KEY=VALUE...] (reasoning-gym); repeat for several.")
@click.option("--n", type=click.IntRange(min=1), default=4, show_default=True, help="Samples per problem (N).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Generation length limit.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sequences per generate call (problems per chunk: batch-size // n).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--repeats", type=click.IntRange(min=1), default=100, show_default=True, help="Random draws per maj@k.")
@click.option("--engine", type=click.Choice(["m1", "hf"]), default="m1", show_default=True,
              help="m1: the M1 generation engine (a Llama runs on it as its all-attention conversion, the same "
                   "computation); hf: transformers' generate on left-padded batches.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory; rerunning with the same settings resumes, different settings are refused.")
def eval_command(models, benchmarks, n, temperature, top_p, max_new_tokens, seed, batch_size, dtype, device, repeats,
                 engine, out):
    """Sample N responses per problem, grade the last \\boxed{} with math-verify, and report pass@1 (mean over
    N), pass@k, maj@k (k = 1, 2, 4, ... <= N), the no-box fraction and throughput.

    Writes OUT/LABEL/samples.jsonl (every sample), OUT/summary.json and OUT/summary.md."""
    from ..cli import _device, _dtype
    from ..utils import check_checkpoint
    from .metrics import summarize
    from .results import SUMMARY_FILE, add_timing, check_settings, markdown_table, model_labels, read_timing

    start = time.perf_counter()
    if n > batch_size:  # a problem's samples run in one batch
        raise click.BadParameter(f"--n {n} samples per problem do not fit in --batch-size {batch_size}: raise "
                                 f"--batch-size to at least {n} or lower --n.", param_hint="--n")
    problems = _load_benchmarks(benchmarks)
    for model_dir in models:  # before any model is loaded
        check_checkpoint(model_dir)
    settings = {"models": [str(Path(m).resolve()) for m in models], "benchmarks": list(benchmarks), "n": n,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "dtype": dtype,
                "engine": engine}
    try:
        check_settings(out, settings)
    except ValueError as err:
        raise click.ClickException(str(err))
    summaries = {}
    for model_dir, label in zip(settings["models"], model_labels(settings["models"])):
        records = _evaluate(model_dir, label, problems, out, n, temperature, top_p, max_new_tokens, seed, batch_size,
                            _dtype(dtype), _device(device), engine)
        summaries[label] = add_timing(summarize(records, repeats=repeats, seed=seed), read_timing(out / label))
        (out / label / SUMMARY_FILE).write_text(json.dumps(summaries[label], indent=2))
    (out / SUMMARY_FILE).write_text(json.dumps(summaries, indent=2))
    table = markdown_table(summaries)
    (out / "summary.md").write_text(f"# m1 eval\n\n{_settings_line(settings)}\n\n{table}")
    click.echo(table)
    for label, rows in summaries.items():
        if rows["overall"]["no_box"] > 0:
            click.echo(f"{label}: {rows['overall']['no_box']:.1%} of samples have no \\boxed{{}} answer (graded wrong); "
                       f"{rows['overall']['cut']:.1%} stopped at --max-new-tokens.")
    click.echo(f"results in {out} ({time.perf_counter() - start:.0f} s)")


def _load_benchmarks(specs):
    from .benchmarks import load_benchmark

    problems, names = [], {}
    for spec in specs:
        try:
            loaded = load_benchmark(spec)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--benchmark")
        name = loaded[0].benchmark
        if name in names:
            raise click.BadParameter(f"{spec!r} and {names[name]!r} are both named {name!r}; name one NAME=SPEC.",
                                     param_hint="--benchmark")
        names[name] = spec
        problems.extend(loaded)
    return problems


def _evaluate(model_dir, label, problems, out, n, temperature, top_p, max_new_tokens, seed, batch_size, dtype, device,
              engine="m1"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)

    from .benchmarks import chat_prompt
    from .evaluate import evaluate_model
    from .generate import EngineGenerator, HFGenerator, engine_for, eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if engine == "hf":
        generator = HFGenerator(model, pad_token_id=pad, eos_token_ids=eos, batch_size=batch_size)
    else:
        longest = max(len(chat_prompt(tokenizer, p)) for p in problems)
        generator = EngineGenerator(engine_for(model, batch_size, longest + max_new_tokens), eos)
    return evaluate_model(generator, tokenizer, eos, problems, out / label, n, temperature, top_p, max_new_tokens, seed,
                          batch_size, label=label)


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "models")


@click.command("tts")
@click.option("--results", "results_specs", multiple=True, required=True, metavar="[NAME=]DIR",
              help="An `m1 eval --out` directory (all its models) or one model's OUT/LABEL; repeat to compare runs. "
                   "Models are named by their directories, or NAME (NAME/LABEL for each model of a run of several): "
                   "`--results t07=runs/eval_a --results t10=runs/eval_b` compares two runs of one model.")
@click.option("--throughput", "throughputs", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="Tokens/s per model, in the order of the models of --results (one per model). Default: the "
                   "tokens/s measured during each model's eval.")
@click.option("--lengths", help="Comma-separated max generation lengths for the length curve "
                                "(default: max-new-tokens / 2^j, 8 points).")
@click.option("--repeats", type=click.IntRange(min=1), default=100, show_default=True, help="Random draws per maj@k.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the plots and tables.")
def tts_command(results_specs, throughputs, lengths, repeats, seed, out):
    """Test-time scaling: accuracy vs number of samples (pass@k, maj@k), vs wall-clock budget (k samples cost
    k * mean length / throughput seconds; the M1 paper's Figures 3-4) and vs maximum generation length.

    Writes OUT/accuracy_vs_{samples,budget,length}.{png,svg,csv,md}."""
    from .results import split_name
    from .tts import budget_curve, default_lengths, length_curve, load_results, samples_curve, write_curve

    results = []
    try:
        for spec in results_specs:
            name, path = split_name(spec)
            results += load_results(Path(path), name)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--results")
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise click.BadParameter(f"models with the same name {labels}; name the runs: --results NAME=DIR.",
                                 param_hint="--results")
    if throughputs and len(throughputs) != len(results):
        raise click.BadParameter(f"got {len(throughputs)} throughputs for {len(results)} models ({', '.join(labels)}); "
                                 "give one per model or none.", param_hint="--throughput")
    if lengths:
        try:
            length_list = sorted({int(v) for v in lengths.split(",") if v.strip()})
        except ValueError:
            raise click.BadParameter(f"expected comma-separated token counts, got {lengths!r}", param_hint="--lengths")
    else:
        length_list = default_lengths(max(r.settings["max_new_tokens"] for r in results))
    out.mkdir(parents=True, exist_ok=True)
    samples_rows, budget_rows, length_rows, summary = [], [], [], []
    for i, result in enumerate(results):
        throughput = throughputs[i] if throughputs else result.measured_throughput
        mean_tokens = sum(r["tokens"] for r in result.records) / len(result.records)
        rows = samples_curve(result, repeats, seed)
        samples_rows += rows
        budget_rows += budget_curve(rows, mean_tokens, throughput)
        length_rows += length_curve(result, length_list, repeats, seed)
        summary.append(f"{result.label}: {throughput:.1f} tok/s, mean length {mean_tokens:.1f} tokens, "
                       f"{mean_tokens / throughput:.3f} s per sample")
    write_curve(samples_rows, out / "accuracy_vs_samples", "samples k", "Accuracy vs number of samples")
    write_curve(budget_rows, out / "accuracy_vs_budget", "seconds (k samples x mean length / throughput)",
                "Accuracy vs time budget")
    write_curve(length_rows, out / "accuracy_vs_length", "max generation length (tokens)", "Accuracy vs generation length")
    click.echo("\n".join(summary))
    click.echo(f"plots and tables in {out}")
