"""A model's own answers to chat prompts: the teacher-written distillation data of `m1 data --teacher` and the
reference answers of `m1 report`.

A record is `{"messages": [*prompt, {"role": "assistant", "content": answer}], "answer": gold, "finished": bool}`:
the answer decoded with special tokens skipped, `finished` true when it ended with an EOS token (false: cut at
max_new_tokens). Axolotl's `chat_template` datasets read `messages` and ignore the other keys.

Generation runs on the project's generation engine (`EngineGenerator`), on CPU as on GPU: on the 2-core CPU of
development, 32 gsm_symbolic prompts x 128 greedy tokens with the SmolLM2 teacher took 59 s on the engine against
90 s with `HFGenerator` (one thread each, run back to back; identical tokens).

Writing is resumable: finished chunks are appended to OUT.partial, a restart continues after them, and only a
complete run is renamed to OUT. The settings (model, max_new_tokens, temperature, seed) are kept next to it in
OUT.settings.json (OUT.partial.settings.json while partial), so answers of other settings are never mixed in.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .eval.generate import EngineGenerator, Generator, HFGenerator, engine_for, eos_token_ids
from .utils import refuse_existing

Problem = tuple[list[dict], str]  # (prompt messages, gold answer), as m1_plugins.data.reasoning_gym_problems


def load_model(model_dir, device="cpu", dtype=torch.float32):
    """(model in eval mode on `device`, its tokenizer) from a checkpoint directory (an M1 hybrid or a Transformer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m1_plugins  # noqa: F401  (registers m1_hybrid with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval(), tokenizer


def answer_settings(model, max_new_tokens: int, temperature: float, seed: int = 0) -> dict:
    """What makes two runs' answers interchangeable: the model (its resolved directory), length limit and sampling."""
    name = str(model.name_or_path if hasattr(model, "name_or_path") else model)
    name = str(Path(name).resolve()) if name and Path(name).exists() else name
    return {"model": name, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat-rendered prompt with the assistant's generation prompt, as token ids."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def make_generator(model, tokenizer, max_model_len: int, batch_size: int = 32, kind: str = "engine") -> Generator:
    """The engine (default; faster than HF generate on CPU too, see the module docstring) or `hf`."""
    eos = eos_token_ids(model, tokenizer)
    if kind == "hf":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return HFGenerator(model, pad_token_id=pad, eos_token_ids=eos, batch_size=batch_size)
    if kind != "engine":
        raise ValueError(f"generator kind {kind!r}: expected 'engine' or 'hf'.")
    # a pool for this batch only: answers are often written next to training jobs on the same GPU
    return EngineGenerator(engine_for(model, batch_size, max_model_len, whole_batch=True), eos)


def iter_answers(model, tokenizer, problems: list[Problem], max_new_tokens: int = 512, temperature: float = 0.0,
                 batch_size: int = 32, generator: str | Generator = "engine", seed: int = 0, chunk_size: int = 64,
                 skip: int = 0, progress: bool = True, desc: str = "answers") -> Iterator[list[dict]]:
    """Answer problems[skip:] `chunk_size` prompts at a time (at least `batch_size`, so that the engine always has
    a full batch to run), yielding each chunk's records (module docstring).
    temperature 0 is greedy; a chunk's seed is `seed` + the index of its first problem, so a resumed run draws
    what an uninterrupted one would. `generator` is a kind for `make_generator` or a ready `Generator`."""
    if skip >= len(problems):
        return
    prompts = [prompt_ids(tokenizer, messages) for messages, _ in problems]
    if isinstance(generator, str):
        generator = make_generator(model, tokenizer, max(map(len, prompts)) + max_new_tokens, batch_size, generator)
    eos = eos_token_ids(model, tokenizer)
    chunk_size = max(chunk_size, batch_size)
    with tqdm(total=len(problems), initial=skip, desc=desc, unit="prompt", disable=not progress) as bar:
        for first in range(skip, len(problems), chunk_size):
            outputs = generator.generate(prompts[first:first + chunk_size], 1, temperature, 1.0, max_new_tokens,
                                         seed + first)
            records = [{"messages": [*messages, {"role": "assistant",
                                                 "content": tokenizer.decode(ids, skip_special_tokens=True)}],
                        "answer": gold, "finished": bool(ids) and ids[-1] in eos}
                       for (messages, gold), (ids,) in zip(problems[first:first + chunk_size], outputs)]
            bar.update(len(records))
            yield records


def generate_answers(model, tokenizer, problems: list[Problem], **kwargs) -> list[dict]:
    """Every record of `iter_answers` (same arguments), in memory."""
    return [record for chunk in iter_answers(model, tokenizer, problems, **kwargs) for record in chunk]


def partial_path(out) -> Path:
    return Path(f"{out}.partial")


def settings_path(out) -> Path:
    return Path(f"{out}.settings.json")


def write_answers(model, tokenizer, problems: list[Problem], out, max_new_tokens: int = 512, temperature: float = 0.0,
                  batch_size: int = 32, generator: str | Generator = "engine", seed: int = 0, chunk_size: int = 64,
                  overwrite: bool = False, device="cpu", progress: bool = True) -> list[dict]:
    """Answer `problems` with `model` (a loaded model with its `tokenizer`, or a checkpoint directory and
    tokenizer None, loaded on `device`) and write the records to `out` (JSONL), resumably (module docstring).
    An existing `out` is refused unless `overwrite`, and replaced only once the new answers are complete; a
    partial run of other settings or prompts is refused too (`overwrite` starts it over). Returns all records."""
    out = Path(out)
    refuse_existing(out, overwrite)
    if tokenizer is None:
        model, tokenizer = load_model(model, device)
    partial, partial_settings = partial_path(out), settings_path(partial_path(out))
    settings = answer_settings(model, max_new_tokens, temperature, seed)
    try:
        done = read_answers(partial, problems, settings, complete=False) if partial.exists() else []
    except ValueError:
        if not overwrite:
            raise
        done = []  # --overwrite: the partial run of other settings is dropped with the rest
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_settings.write_text(json.dumps(settings, indent=2))
    _write_lines(partial, done, "w")  # also drops a line torn by an interruption
    desc = f"answers of {Path(settings['model']).name}"
    for records in iter_answers(model, tokenizer, problems, max_new_tokens, temperature, batch_size, generator, seed,
                                chunk_size, skip=len(done), progress=progress, desc=desc):
        _write_lines(partial, records, "a")
        done.extend(records)
    partial.replace(out)
    partial_settings.replace(settings_path(out))
    return done


def _write_lines(path: Path, records: list[dict], mode: str) -> None:
    with path.open(mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())  # a chunk on disk is a chunk that a restart skips


def read_answers(path, problems: list[Problem], settings: dict | None = None, complete: bool = True) -> list[dict]:
    """The records of an answers file written by `write_answers`, checked against the `problems` they must answer
    (in order; all of them when `complete`, a prefix otherwise) and, when given, the `settings` recorded next to
    the file. Raises ValueError (one line: what differs and the fix) on a mismatch. A last line cut by an
    interruption is dropped."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line can be cut short by an interruption
                raise ValueError(f"{path} line {i + 1} is not JSON; delete the file to write it again.")
    fix = f"delete {path} or name another file" if complete else f"delete {path} to start over"
    recorded = settings_path(path)
    if settings is not None and recorded.exists():
        saved = json.loads(recorded.read_text())
        differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"{path} holds answers of other settings ({'; '.join(differ)}): {fix}.")
    if len(records) > len(problems) or (complete and len(records) != len(problems)):
        raise ValueError(f"{path} holds {len(records)} answers for {len(problems)} prompts: {fix}.")
    for i, (record, (messages, _)) in enumerate(zip(records, problems)):
        if record["messages"][:-1] != messages:
            raise ValueError(f"{path} answer {i + 1} is to another prompt than prompt {i + 1} now: {fix}.")
    return records
