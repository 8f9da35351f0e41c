"""Evaluation and test-time scaling: benchmarks, \\boxed{} grading with math-verify, pass@k / maj@k, `m1 eval`
and `m1 tts`. Framework-free (no axolotl / verl / vllm imports)."""

from .benchmarks import Problem, chat_prompt, load_benchmark
from .generate import Generator, HFGenerator
from .grading import Grade, answers_equal, extract_boxed, grade
from .metrics import answer_groups, majority_at_k, mean_ci, pass_at_k, summarize

__all__ = ["Generator", "Grade", "HFGenerator", "Problem", "answer_groups", "answers_equal", "chat_prompt",
           "extract_boxed", "grade", "load_benchmark", "majority_at_k", "mean_ci", "pass_at_k", "summarize"]
