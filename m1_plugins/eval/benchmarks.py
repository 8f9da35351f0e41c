"""Benchmarks from local files (MATH500, AIME24/25, AMC23, OlympiadBench layouts) and offline reasoning-gym
task sets, as `Problem`s; and the prompt each problem is asked with.

A benchmark SPEC is `[NAME=]SOURCE`, where SOURCE is one of
- a file `PATH.jsonl|.json|.parquet` (default name: the file stem);
- `rg:TASK[,size=N][,seed=S][,KEY=VALUE...]`, a reasoning-gym task (default name: TASK; default size
  100, seed 0); other KEY=VALUE pairs go to the task's config, e.g.
  `arith=rg:basic_arithmetic,size=100,min_terms=2,max_terms=2`.

Columns are detected case-insensitively: the question from `problem` or `question`; the answer from
`answer`, `final_answer` (a list, as in OlympiadBench, is joined with commas) or, failing those, the
last \\boxed{} of `solution` (MATH-style); the id from `unique_id`, `id`, `problem_id` or `idx`, else the
row number.
"""

import dataclasses
import difflib
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..data import M1_PROMPT_SUFFIX, parse_tasks
from .grading import extract_boxed
from .results import split_name

QUESTION_COLUMNS = ("problem", "question")
ANSWER_COLUMNS = ("answer", "final_answer")
SOLUTION_COLUMNS = ("solution",)
ID_COLUMNS = ("unique_id", "id", "problem_id", "idx")
REASONING_GYM_PREFIX = "rg:"


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: `problem` is the question text, `answer` the ground truth (LaTeX or plain)."""

    benchmark: str
    problem_id: str
    problem: str
    answer: str


def load_benchmark(spec: str) -> list[Problem]:
    """The problems of one benchmark SPEC (module docstring). Raises ValueError on an unknown layout,
    an empty question or answer, or duplicate ids."""
    name, source = split_name(spec)
    if source.startswith(REASONING_GYM_PREFIX):
        problems = _load_reasoning_gym(name, source[len(REASONING_GYM_PREFIX):])
    else:
        path = Path(source)
        problems = [_problem(name or path.stem, row, i, path) for i, row in enumerate(_read_rows(path))]
    if not problems:
        raise ValueError(f"benchmark {spec!r} has no problems.")
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"benchmark {spec!r} has duplicate problem ids {duplicates}; ids must be unique.")
    return problems


def chat_prompt(tokenizer, problem: Problem) -> list[int]:
    """Token ids of the model's chat template with one user turn, problem + "\\n" + the M1 suffix, and the
    assistant's generation prompt."""
    messages = [{"role": "user", "content": f"{problem.problem}\n{M1_PROMPT_SUFFIX}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"benchmark file {path} does not exist (or use rg:TASK for a reasoning-gym task).")
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if path.suffix == ".jsonl":
        return [_json_line(line, path, number) for number, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}.")
        return rows
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}, column {err.colno}): one object per line.")


def _column(row: dict, candidates: tuple[str, ...]):
    by_lower = {key.lower(): key for key in row}
    return next((by_lower[c] for c in candidates if c in by_lower), None)


def _problem(benchmark: str, row: dict, index: int, path: Path) -> Problem:
    question_col = _column(row, QUESTION_COLUMNS)
    answer_col = _column(row, ANSWER_COLUMNS)
    solution_col = None if answer_col else _column(row, SOLUTION_COLUMNS)
    if question_col is None or (answer_col is None and solution_col is None):
        raise ValueError(
            f"{path} row {index}: unknown layout, columns found: {sorted(row)}. Expected a question column "
            f"({' or '.join(QUESTION_COLUMNS)}) and an answer column ({' or '.join(ANSWER_COLUMNS)}, "
            f"or {SOLUTION_COLUMNS[0]} with a \\boxed{{}} answer), matched case-insensitively.")
    if answer_col is not None:
        answer = row[answer_col]
        if not isinstance(answer, str) and hasattr(answer, "__len__"):  # OlympiadBench: a list of final answers
            answer = ",".join(str(a).strip().strip("$") for a in answer)
    else:
        answer = extract_boxed(str(row[solution_col]))
        if answer is None:
            raise ValueError(f"{path} row {index}: no answer column and no \\boxed{{}} answer in {solution_col!r}.")
    id_col = _column(row, ID_COLUMNS)
    problem_id = str(row[id_col]) if id_col is not None else str(index)
    return _checked(Problem(benchmark, problem_id, str(row[question_col]), str(answer)), f"{path} row {index}")


def _checked(problem: Problem, where: str) -> Problem:
    if not problem.problem.strip():
        raise ValueError(f"{where} (id {problem.problem_id}): empty question.")
    if not problem.answer.strip():
        raise ValueError(f"{where} (id {problem.problem_id}): empty answer; every problem needs a ground truth.")
    return problem


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _load_reasoning_gym(name: str | None, spec: str) -> list[Problem]:
    task, *options = spec.split(",")
    parse_tasks(task)  # an unknown task (named with the closest one), or reasoning-gym not installed
    import reasoning_gym

    fields = {f.name: f for f in dataclasses.fields(reasoning_gym.factory.DATASETS[task][1])}
    config = {"size": 100, "seed": 0}
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if not sep:
            raise ValueError(f"rg:{spec}: expected KEY=VALUE options after the task name, got {option!r}.")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"rg:{spec}: {task} has no option {key!r}; {hint}options: {', '.join(fields)}.")
        config[key] = _parse_value(value)
        default = fields[key].default
        if type(default) in (int, float) and type(config[key]) not in (int, type(default)):  # size=abc, size=1.5
            raise ValueError(f"rg:{spec}: {key}={value} must be {'an integer' if type(default) is int else 'a number'}.")
    if config["size"] < 1:
        raise ValueError(f"rg:{spec}: size={config['size']} must be a positive integer (the number of problems).")
    try:
        dataset = reasoning_gym.create_dataset(task, **config)
    except AssertionError as err:  # each task checks its own options with asserts (min_terms=0), some without a message
        check = str(err) or traceback.extract_tb(err.__traceback__)[-1].line
        raise ValueError(f"rg:{spec}: {task} refuses these options ({check}).") from err
    return [_checked(Problem(name or task, str(i), item["question"], str(item["answer"])), f"rg:{spec} item {i}")
            for i, item in enumerate(dataset)]
