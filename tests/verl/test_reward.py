"""The GRPO reward: tricky answers graded as VeRL calls it (from worker threads), bad rows, VeRL's own loader
and reward manager."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("verl")
pytest.importorskip("math_verify")

from m1_plugins.verl.reward import GRADE_TIMEOUT_S, compute_score  # noqa: E402

# (response, ground truth, pred, score)
CASES = [
    ("so \\boxed{\\frac{3}{4}}.", "0.75", "\\frac{3}{4}", 1.0),  # fraction vs decimal
    ("\\boxed{3/4}", "\\frac34", "3/4", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "$\\frac{1}{2}$", "\\dfrac{1}{2}", 1.0),  # LaTeX forms, gold in dollars
    ("\\boxed{1/3}", "0.333", "1/3", 0.0),  # a rounded decimal is not the fraction
    ("\\boxed{5\\text{ cm}}", "5", "5\\text{ cm}", 1.0),  # units
    ("\\boxed{90^\\circ}", "90", "90^\\circ", 1.0),
    ("\\boxed{\\$18}", "18", "\\$18", 1.0),
    ("\\boxed{1,000}", "1000", "1,000", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", "x^2+2x+1", 1.0),  # symbolic equality
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", "(-\\infty, 3]", 1.0),
    ("First \\boxed{3}, then \\boxed{5}.", "3", "5", 0.0),  # the last box counts
    ("The answer is 7.", "7", "", 0.0),  # no box: no answer
    ("\\boxed{7} and then \\boxed{\\frac{1}{", "7", "", 0.0),  # the last box never closes (cut off)
    ("\\boxed{12}", 12, "12", 1.0),  # a numeric ground truth
]


def _in_thread(**kwargs):
    """VeRL's NaiveRewardManager runs a sync reward function through run_in_executor: not the main thread."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(compute_score, **kwargs).result()


@pytest.mark.parametrize("response,gold,pred,score", CASES)
def test_tricky_answers_from_a_worker_thread(response, gold, pred, score):
    result = _in_thread(data_source="math", solution_str=response, ground_truth=gold, extra_info={"index": 0})
    assert result == {"score": score, "acc": score == 1.0, "pred": pred, "boxed": pred != "", "grading_failed": False}


def test_pathological_answer_is_bounded_and_scores_zero():
    # sympy would expand this for a very long time; math-verify's alarm stops it inside the pool process
    start = time.monotonic()
    result = _in_thread(data_source="math", solution_str="\\boxed{10^{10^{10}}}", ground_truth="1")
    assert result["score"] == 0.0 and result["pred"] == "10^{10^{10}}"
    assert time.monotonic() - start < GRADE_TIMEOUT_S


@pytest.mark.parametrize("gold", [None, "", "   ", ["1"]])
def test_row_without_ground_truth_raises(gold):
    with pytest.raises(ValueError, match="ground_truth must be a non-empty answer string.*index': 3"):
        compute_score("math", "\\boxed{1}", gold, extra_info={"index": 3})


def test_loaded_and_called_by_verl(smollm2_dir):
    """VeRL's loader (reward.custom_reward_function) and its naive reward manager, on a real tokenized response."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": "pkg://m1_plugins.verl.reward",
                                                                      "name": "compute_score"}}})
    reward_fn = get_custom_reward_fn(config)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer("What is 1/2 + 1/4?", return_tensors="pt")["input_ids"]
    response = tokenizer("We add the fractions: the answer is $\\boxed{\\frac{3}{4}}$.", return_tensors="pt")["input_ids"]
    response = torch.cat([response, torch.full((1, 4), tokenizer.pad_token_id)], dim=1)  # right padding
    data = DataProto.from_dict(
        tensors={"prompts": prompt, "responses": response,
                 "attention_mask": torch.cat([torch.ones_like(prompt), (response != tokenizer.pad_token_id).long()], 1)},
        non_tensors={"data_source": np.array(["math"], dtype=object),
                     "reward_model": np.array([{"style": "rule", "ground_truth": "0.75"}], dtype=object),
                     "extra_info": np.array([{"index": 0}], dtype=object)})

    async def run():
        return await NaiveRewardManager(config, tokenizer, reward_fn).run_single(data)

    result = asyncio.run(run())
    assert result["reward_score"] == 1.0
    assert result["reward_extra_info"]["pred"] == "\\frac{3}{4}" and result["reward_extra_info"]["acc"] is True
