"""Benchmark loaders: each common layout detected from small fixture files, clear errors otherwise."""

import json

import pandas as pd
import pytest

from m1_plugins.eval.benchmarks import Problem, load_benchmark


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math500_layout(tmp_path):
    path = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is $1/2 + 0$?", "solution": "It is \\boxed{\\frac12}.", "answer": "\\frac{1}{2}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}])
    assert load_benchmark(str(path)) == [Problem("math500", "test/algebra/1.json", "What is $1/2 + 0$?", "\\frac{1}{2}")]


def test_math_solution_only_layout_takes_the_last_box(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "p0", "solution": "First \\boxed{1}, finally $\\boxed{\\frac{\\sqrt{3}}{2}}$."}])
    assert load_benchmark(str(path))[0].answer == "\\frac{\\sqrt{3}}{2}"


def test_aime_layout_parquet_capitalised_columns(tmp_path):
    path = tmp_path / "aime24.parquet"
    pd.DataFrame({"ID": ["2024-I-1", "2024-I-2"], "Problem": ["p1", "p2"], "Answer": [204, 25]}).to_parquet(path)
    assert load_benchmark(str(path)) == [Problem("aime24", "2024-I-1", "p1", "204"), Problem("aime24", "2024-I-2", "p2", "25")]


def test_amc_layout_json_list_and_row_ids(tmp_path):
    path = tmp_path / "amc23.json"
    path.write_text(json.dumps([{"question": "q0", "answer": 27.0}, {"question": "q1", "answer": "3"}]))
    assert load_benchmark(str(path)) == [Problem("amc23", "0", "q0", "27.0"), Problem("amc23", "1", "q1", "3")]


def test_olympiadbench_layout_final_answer_lists(tmp_path):
    rows = [{"id": 7, "question": "q", "final_answer": ["$\\frac{1}{2}$"], "solution": ["..."]},
            {"id": 8, "question": "q2", "final_answer": ["$1$", "$2$"], "solution": ["..."]}]
    jsonl = write_jsonl(tmp_path / "olympiad.jsonl", rows)
    parquet = tmp_path / "olympiad.parquet"
    pd.DataFrame(rows).to_parquet(parquet)  # lists come back as numpy arrays
    for path in (jsonl, parquet):
        assert [(p.problem_id, p.answer) for p in load_benchmark(f"OB={path}")] == [("7", "\\frac{1}{2}"), ("8", "1,2")]
        assert load_benchmark(f"OB={path}")[0].benchmark == "OB"


def test_unknown_layout_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError) as err:
        load_benchmark(str(path))
    message = str(err.value)
    assert "columns found: ['prompt', 'response']" in message
    assert "question column (problem or question)" in message and "answer column (answer or final_answer" in message


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty answer"):
        load_benchmark(str(write_jsonl(tmp_path / "empty.jsonl", [{"problem": "p", "answer": "  "}])))
    with pytest.raises(ValueError, match=r"duplicate problem ids \['1'\]"):
        load_benchmark(str(write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "p", "answer": "1"}] * 2)))
    with pytest.raises(ValueError, match=r"no answer column and no \\boxed\{\} answer in 'solution'"):
        load_benchmark(str(write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "it is 3"}])))
    (tmp_path / "x.csv").write_text("problem,answer\np,1\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_benchmark(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="has no problems"):
        load_benchmark(str(write_jsonl(tmp_path / "none.jsonl", [])))


def test_reasoning_gym_task_set():
    import reasoning_gym

    problems = load_benchmark("rg:basic_arithmetic,size=5,seed=3,min_terms=2,max_terms=2")
    items = list(reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=3, min_terms=2, max_terms=2))
    assert problems == [Problem("basic_arithmetic", str(i), item["question"], item["answer"]) for i, item in enumerate(items)]
    assert len(load_benchmark("arith=rg:basic_arithmetic")) == 100  # default size
    assert load_benchmark("arith=rg:basic_arithmetic,size=2")[0].benchmark == "arith"
    with pytest.raises(ValueError, match="expected KEY=VALUE options after the task name, got 'size'"):
        load_benchmark("rg:basic_arithmetic,size")
