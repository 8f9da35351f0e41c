"""VeRL reward of M1's GRPO: 1.0 when the last \\boxed{} of the response equals the ground truth, else 0.0.

In a VeRL config:

    reward:
      custom_reward_function:
        path: pkg://m1_plugins.verl.reward
        name: compute_score

The rule is `m1_plugins.eval.grading` (the same as `m1 eval`): the last closed box, compared with the
ground truth by math-verify. The comparison runs in a small process pool because VeRL calls reward
functions from worker threads (`run_in_executor`), where math-verify's signal-based timeouts refuse to
run; in a pool process they work, so a pathological answer cannot stall the step. A sample whose grading fails or times out scores 0 and is
logged; the step goes on. A row without a ground truth is a data error and raises.
"""

import concurrent.futures
import logging
import multiprocessing
import threading

from ..eval.grading import answers_equal, extract_boxed

logger = logging.getLogger(__name__)

# math-verify's own alarms stop each parse / comparison after 5 s; this bounds the whole call.
GRADE_TIMEOUT_S = 60.0
POOL_WORKERS = 2

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> concurrent.futures.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: the caller may hold CUDA contexts and Ray threads, which fork would copy half-alive
            _pool = concurrent.futures.ProcessPoolExecutor(POOL_WORKERS, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _drop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def _ground_truth(ground_truth, data_source, extra_info) -> str:
    if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool):
        ground_truth = str(ground_truth)
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        where = f"data_source {data_source!r}, extra_info {dict(extra_info or {})}"
        raise ValueError(f"reward_model.ground_truth must be a non-empty answer string, got {ground_truth!r} ({where}). "
                         "Rewrite the dataset with `m1 verl-data`, which refuses rows without an answer.")
    return ground_truth


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """VeRL's custom reward signature. Returns {"score", "acc", "pred", "boxed", "grading_failed"}: VeRL uses
    "score" as the reward and logs the other keys (validation uses "acc" for accuracy and "pred" for maj@k).

    Args:
        data_source: the row's `data_source` (only used in messages).
        solution_str: the decoded response.
        ground_truth: the row's `reward_model.ground_truth` (LaTeX or plain answer).
        extra_info: the row's `extra_info` (only used in messages).
        **kwargs: further keys VeRL passes (`reward_kwargs` of the config, reward-model handles); unused.
    """
    gold = _ground_truth(ground_truth, data_source, extra_info)
    answer = extract_boxed(solution_str)  # plain string work: no pool round trip for box-less responses
    correct = failed = False
    if answer is not None:
        pool = _get_pool()
        try:
            correct = pool.submit(answers_equal, gold, answer).result(timeout=GRADE_TIMEOUT_S)
        except Exception as err:  # the sample scores 0 and the step goes on
            logger.warning("grading failed (%s: %s); the sample scores 0. data_source=%r, extra_info=%r, "
                           "ground_truth=%r, answer=%r", type(err).__name__, err, data_source, extra_info, gold, answer)
            if isinstance(err, concurrent.futures.process.BrokenProcessPool):  # every later submit would fail too
                _drop_pool(pool)
            failed = True
    return {"score": float(correct), "acc": bool(correct), "pred": answer if answer is not None else "",
            "boxed": answer is not None, "grading_failed": failed}
