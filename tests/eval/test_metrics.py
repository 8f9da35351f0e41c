"""pass@k and maj@k against exhaustive enumeration, answer canonicalisation, confidence intervals, summaries."""

import itertools
import math
from collections import Counter

import pytest

from m1_plugins.eval.metrics import answer_groups, majority_at_k, mean_ci, pass_at_k, powers_of_two, summarize


def brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not need it
    exact = 1 - math.comb(990, 500) / math.comb(1000, 500)
    assert pass_at_k(1000, 10, 500) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, rel=1e-12)


def test_k_larger_than_n_raises():
    with pytest.raises(ValueError, match=r"pass@4 needs 1 <= k <= N samples per problem, got N=2"):
        pass_at_k(2, 1, 4)
    with pytest.raises(ValueError, match=r"maj@3 needs 1 <= k <= N samples per problem, got N=2"):
        majority_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(2, 3, 1)


def test_answer_groups_canonicalise_with_math_verify():
    answers = ["\\frac{1}{2}", "0.5", "1/2", "2", "2.0", None, "x=2", "\\dfrac12", "", ""]
    assert answer_groups(answers) == [0, 0, 0, 1, 1, None, 1, 0, 2, 2]


def exact_majority(keys, correct, k):
    """maj@k by enumeration of k-subsets. Ties are a uniform choice between the tied answers, and the
    winner's correctness is the mean over its drawn samples: what 'first drawn wins' in a uniformly random
    draw order gives in expectation."""
    total, subsets = 0.0, list(itertools.combinations(range(len(keys)), k))
    for subset in subsets:
        counts = Counter(keys[i] for i in subset if keys[i] is not None)
        if not counts:
            continue
        top = max(counts.values())
        tied = [key for key, count in counts.items() if count == top]
        total += sum(sum(correct[i] for i in subset if keys[i] == key) / top for key in tied) / len(tied)
    return total / len(subsets)


# (answers, canonical keys written by hand, correctness)
MAJORITY_CASES = [
    (["1/2", "0.5", "3", "3", "\\frac{1}{2}", None, "7"], ["h", "h", "3", "3", "h", None, "7"],
     [True, True, False, False, True, False, False]),
    (["1", "2", "3", "4"], ["1", "2", "3", "4"], [True, False, False, False]),  # all ties
    (["5", None, None, "6", "6", "5"], ["5", None, None, "6", "6", "5"], [True, False, False, False, False, True]),
]


@pytest.mark.parametrize("answers,keys,correct", MAJORITY_CASES)
def test_majority_at_k_matches_exhaustive_enumeration(answers, keys, correct):
    repeats = 4000
    for k in range(1, len(answers) + 1):
        exact = exact_majority(keys, correct, k)
        estimate = majority_at_k(answers, correct, k, repeats=repeats, seed=123)
        sampling_error = math.sqrt(exact * (1 - exact) / repeats)
        assert abs(estimate - exact) <= 4 * sampling_error + 1e-12, (k, estimate, exact)


def test_majority_tie_rule_and_abstentions():
    # a 1-1 tie between a right and a wrong answer: a fair coin
    assert majority_at_k(["1", "2"], [True, False], 2, repeats=4000, seed=0) == pytest.approx(0.5, abs=0.04)
    # samples without a box abstain: the single boxed answer wins
    assert majority_at_k([None, None, "4"], [False, False, True], 3) == 1.0
    # nothing boxed: a draw scores 0
    assert majority_at_k([None] * 4, [False] * 4, 2) == 0.0
    # equal forms outvote a more frequent raw string
    assert majority_at_k(["0.5", "\\frac{1}{2}", "1/2", "3", "3"], [True, True, True, False, False], 5) == 1.0


def test_mean_ci_normal_approximation():
    ci = mean_ci([1.0, 0.0, 1.0, 1.0])
    half = 1.959963984540054 * 0.5 / 2  # std (ddof=1) of [1,0,1,1] is 0.5
    assert ci == pytest.approx({"mean": 0.75, "low": 0.75 - half, "high": 1.0})
    assert mean_ci([0.3]) == {"mean": 0.3, "low": 0.3, "high": 0.3}
    with pytest.raises(ValueError, match="no graded problems"):
        mean_ci([])


def test_powers_of_two():
    assert powers_of_two(1) == [1]
    assert powers_of_two(6) == [1, 2, 4]
    assert powers_of_two(8) == [1, 2, 4, 8]


def record(benchmark, problem, sample, answer, correct, tokens=10, finished=True):
    return {"benchmark": benchmark, "problem_id": problem, "sample": sample, "answer": answer, "correct": correct,
            "tokens": tokens, "finished": finished}


def test_summarize_per_benchmark_and_overall():
    records = [
        record("a", "0", 0, "1", True), record("a", "0", 1, "2", False, tokens=20, finished=False),
        record("a", "1", 0, None, False), record("a", "1", 1, None, False),
        record("b", "0", 1, "3", True), record("b", "0", 0, "3", True, tokens=30),
    ]
    rows = summarize(records, repeats=50)
    assert list(rows) == ["a", "b", "overall"]
    a, b, overall = rows["a"], rows["b"], rows["overall"]
    assert (a["problems"], a["n"], b["problems"], overall["problems"]) == (2, 2, 1, 3)
    assert a["pass@1"]["mean"] == pytest.approx(0.25)  # problem 0: 1/2, problem 1: 0
    assert a["pass@2"]["mean"] == pytest.approx(0.5)
    assert b["maj@2"]["mean"] == 1.0
    assert overall["pass@1"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert a["no_box"] == 0.5 and overall["no_box"] == pytest.approx(2 / 6)
    assert a["cut"] == 0.25 and overall["cut"] == pytest.approx(1 / 6)
    assert (overall["tokens"], b["mean_tokens"]) == (90, 20.0)
    with pytest.raises(ValueError, match=r"different sample counts \[1, 2\]"):
        summarize(records[:5])
