"""`m1 verl-data`: VeRL's RL parquet from a MATH-style file and a reasoning-gym task, read back by VeRL's own
RLHFDataset with the real SmolLM2 tokenizer; refusals of bad input."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("verl")

from m1_plugins.cli import main  # noqa: E402
from m1_plugins.data import M1_PROMPT_SUFFIX  # noqa: E402

MATH_ROWS = [
    {"problem": "What is $1/2 + 1/4$?", "solution": "Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
     "unique_id": "test/algebra/1.json"},
    {"problem": "Solve $x + 2 = 7$.", "answer": "5", "unique_id": "test/algebra/2.json"},
]


def run(args):
    return CliRunner().invoke(main, ["verl-data", *map(str, args)])


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return path


def test_rows_from_a_math_file_and_reasoning_gym(math_file, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "train.parquet"
    result = run(["--benchmark", math_file, "--benchmark", "arith=rg:basic_arithmetic,size=2,seed=0,min_terms=2,max_terms=2",
                  "--out", out])
    assert result.exit_code == 0, result.output
    assert "wrote 4 train problems (math500: 2, arith: 2)" in result.output
    rows = pq.read_table(out).to_pylist()
    assert rows[:2] == [
        {"data_source": "math500",
         "prompt": [{"role": "user", "content": f"What is $1/2 + 1/4$?\n{M1_PROMPT_SUFFIX}"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "\\frac{3}{4}"},
         "extra_info": {"split": "train", "index": 0, "problem_id": "test/algebra/1.json"}},
        {"data_source": "math500",
         "prompt": [{"role": "user", "content": f"Solve $x + 2 = 7$.\n{M1_PROMPT_SUFFIX}"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "5"},
         "extra_info": {"split": "train", "index": 1, "problem_id": "test/algebra/2.json"}},
    ]
    assert [(r["data_source"], r["prompt"][0]["content"], r["reward_model"]["ground_truth"], r["extra_info"]["index"])
            for r in rows[2:]] == [("arith", f"Calculate -1515 / 15.\n{M1_PROMPT_SUFFIX}", "-101", 2),
                                   ("arith", f"Calculate 5 - 3.\n{M1_PROMPT_SUFFIX}", "2", 3)]


def test_verl_rlhf_dataset_reads_it(math_file, tmp_path, smollm2_dir):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = tmp_path / "val.parquet"
    assert run(["--benchmark", math_file, "--split", "test", "--out", out]).exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 1024, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(str(out), tokenizer, config)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["raw_prompt"] == [{"role": "user", "content": f"Solve $x + 2 = 7$.\n{M1_PROMPT_SUFFIX}"}]
    assert item["reward_model"] == {"style": "rule", "ground_truth": "5"}
    assert (item["data_source"], item["index"], item["extra_info"]["split"]) == ("math500", 1, "test")
    # what the agent loop sends to the rollout: the chat template with the assistant's generation prompt
    text = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert text.endswith(f"{M1_PROMPT_SUFFIX}<|im_end|>\n<|im_start|>assistant\n")

    # a prompt over max_prompt_length is filtered by VeRL itself
    config.max_prompt_length = 20
    assert len(RLHFDataset(str(out), tokenizer, config)) == 0


def test_refusals(math_file, tmp_path):
    no_answer = tmp_path / "bad.jsonl"
    no_answer.write_text(json.dumps(MATH_ROWS[1]) + "\n" + json.dumps({"problem": "What is 2 + 2?", "solution": "Four."}) + "\n")
    result = run(["--benchmark", no_answer, "--out", tmp_path / "x.parquet"])
    assert result.exit_code != 0 and "bad.jsonl row 1: no answer column and no \\boxed{} answer" in result.output
    assert not (tmp_path / "x.parquet").exists()

    result = run(["--benchmark", math_file, "--out", tmp_path / "x.jsonl"])
    assert result.exit_code != 0 and "VeRL reads .parquet files" in result.output

    out = tmp_path / "train.parquet"
    assert run(["--benchmark", math_file, "--out", out]).exit_code == 0
    result = run(["--benchmark", math_file, "--out", out])
    assert result.exit_code != 0 and "already exists" in result.output and "--overwrite" in result.output
    assert run(["--benchmark", math_file, "--out", out, "--overwrite"]).exit_code == 0
