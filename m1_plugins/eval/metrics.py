"""Sampling metrics: unbiased pass@k, majority vote maj@k, and per-benchmark tables with confidence intervals.

Conventions:
- Every metric is computed per problem from its N graded samples, then averaged over problems.
- pass@1 is the mean correctness over the N samples (= pass_at_k(N, c, 1) = c / N).
- maj@k: draw k of the N samples without replacement (in random order), take the most frequent answer
  among the drawn samples that have one, score 1 if it is correct; averaged over `repeats` draws (the
  M1 paper uses 100). Answers vote together when math-verify finds them equal (`answer_groups`).
  **Tie rule**: among equally frequent answers the one drawn first wins; since the draw order is uniform,
  this is a uniformly random choice between the tied answers. Samples without a box abstain; a draw
  whose k samples all lack a box scores 0.
- Confidence intervals are the normal approximation over problems: mean +- 1.96 * std / sqrt(problems)
  of the per-problem scores (std with ddof=1), clipped to [0, 1]. They reflect problem sampling only
  (not the randomness of the N samples).
"""

import math
import random
from collections import Counter, defaultdict

from .grading import answers_equal

Z_95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021),
    as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no huge binomials)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= N samples per problem, got N={n}; sample more (--n) or lower k.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_groups(answers: list[str | None]) -> list[int | None]:
    """Group ids of answers (None stays None): answers equal under math-verify share an id. Each answer
    joins the first earlier group whose first member it equals (`answers_equal(first, answer)`)."""
    representatives: list[str] = []
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        group = next((g for g, rep in enumerate(representatives) if answers_equal(rep, answer)), None)
        if group is None:
            group = len(representatives)
            representatives.append(answer)
        ids.append(group)
    return ids


def majority_vote(groups: list[int | None], correct: list[bool], draw: list[int]) -> bool:
    """Is the majority answer of the samples `draw` (indices, in draw order) correct? Tie: first drawn wins.
    The winning answer's correctness is that of its first drawn sample."""
    counts = Counter(groups[i] for i in draw if groups[i] is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(i for i in draw if groups[i] is not None and counts[groups[i]] == top)
    return bool(correct[winner])


def majority_at_k(answers: list[str | None], correct: list[bool], k: int, repeats: int = 100, seed: int = 0) -> float:
    """maj@k of one problem: the mean over `repeats` random draws of k of its N samples (module docstring).

    answers: (N,) extracted answers, None for samples without a box; correct: (N,) their grades.
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"majority_at_k got {n} answers but {len(correct)} grades.")
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} needs 1 <= k <= N samples per problem, got N={n}; sample more (--n) or lower k.")
    groups = answer_groups(answers)
    rng = random.Random(seed)
    return sum(majority_vote(groups, correct, rng.sample(range(n), k)) for _ in range(repeats)) / repeats


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n (the k of pass@k / maj@k reported for N = n samples)."""
    return [2 ** i for i in range(n.bit_length())]


def mean_ci(values: list[float]) -> dict:
    """Mean with a 95% normal-approximation confidence interval over problems (module docstring)."""
    if not values:
        raise ValueError("mean_ci got no values: the benchmark has no graded problems.")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return {"mean": mean, "low": mean, "high": mean}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = Z_95 * std / math.sqrt(len(values))
    return {"mean": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half)}


def group_by_problem(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Sample records grouped by (benchmark, problem_id), each group sorted by sample index."""
    problems = defaultdict(list)
    for record in records:
        problems[record["benchmark"], record["problem_id"]].append(record)
    return {key: sorted(group, key=lambda r: r["sample"]) for key, group in problems.items()}


def problem_scores(samples: list[dict], ks: list[int], repeats: int = 100, seed: int = 0) -> dict[str, float]:
    """Per-problem pass@k and maj@k for each k in ks from its N sample records (`answer`, `correct`)."""
    n, c = len(samples), sum(r["correct"] for r in samples)
    answers, correct = [r["answer"] for r in samples], [r["correct"] for r in samples]
    scores = {}
    for k in ks:
        scores[f"pass@{k}"] = pass_at_k(n, c, k)
        scores[f"maj@{k}"] = majority_at_k(answers, correct, k, repeats, seed)
    return scores


def summarize(records: list[dict], repeats: int = 100, seed: int = 0) -> dict[str, dict]:
    """Per-benchmark rows and an "overall" row (all problems pooled) from sample records.

    Each row: problems, n (samples per problem), pass@k / maj@k for k in powers of two <= n (each a
    `mean_ci` dict over problems), no_box (fraction of samples without an answer), cut (fraction stopped
    by the length limit, not by EOS), tokens (generated), mean_tokens (per sample). Every problem must
    have the same N.
    """
    problems = group_by_problem(records)
    sizes = {len(samples) for samples in problems.values()}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sizes)}; a summary needs the same N for all.")
    n = sizes.pop()
    ks = powers_of_two(n)
    per_problem = {key: problem_scores(samples, ks, repeats, seed) for key, samples in problems.items()}
    benchmarks = list(dict.fromkeys(key[0] for key in problems))
    rows = {}
    for name in [*benchmarks, "overall"]:
        keys = [key for key in problems if name == "overall" or key[0] == name]
        samples = [r for key in keys for r in problems[key]]
        row = {"problems": len(keys), "n": n}
        for metric in per_problem[keys[0]]:
            row[metric] = mean_ci([per_problem[key][metric] for key in keys])
        row["no_box"] = sum(r["answer"] is None for r in samples) / len(samples)
        row["cut"] = sum(not r["finished"] for r in samples) / len(samples)
        row["tokens"] = sum(r["tokens"] for r in samples)
        row["mean_tokens"] = row["tokens"] / len(samples)
        rows[name] = row
    return rows
