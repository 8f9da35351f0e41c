"""Offline datasets: reasoning-gym tasks rendered as chat conversations with the M1 prompt suffix."""

import difflib

M1_PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
DATA_INSTALL = 'pip install "m1-plugins[data]"'


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"reasoning-gym is needed for offline task data. Install: {DATA_INSTALL}") from err
    return reasoning_gym


def _reasoning_gym_items(task: str, size: int, seed: int):
    return _reasoning_gym().create_dataset(task, size=size, seed=seed)


def _user_turn(item) -> dict:
    return {"role": "user", "content": f"{item['question']}\n{M1_PROMPT_SUFFIX}"}


def reasoning_gym_problems(task: str = "gsm_symbolic", size: int = 64, seed: int = 0) -> list[tuple[list[dict], str]]:
    """`size` problems of a reasoning-gym task as (prompt messages, gold answer): the prompt is the single user
    turn of `reasoning_gym_conversations` (question + the paper's suffix), the answer the task's ground truth."""
    return [([_user_turn(item)], str(item["answer"])) for item in _reasoning_gym_items(task, size, seed)]


def reasoning_gym_conversations(task: str = "gsm_symbolic", size: int = 64, seed: int = 0) -> list[list[dict]]:
    """`size` problems of a reasoning-gym task as [user, assistant] messages.

    The user turn is the question plus the paper's suffix; the assistant turn is the task's worked
    solution when it has one (`metadata.answer_cot`), ending with the answer in \\boxed{}.
    """
    conversations = []
    for item in _reasoning_gym_items(task, size, seed):
        solution = item["metadata"].get("answer_cot") or ""
        answer = f"{solution}\nThe final answer is \\boxed{{{item['answer']}}}.".strip()
        conversations.append([_user_turn(item), {"role": "assistant", "content": answer}])
    return conversations


def parse_tasks(value: str) -> list[str]:
    """Task names of a comma-separated list (`gsm_symbolic,basic_arithmetic`), in order, without duplicates."""
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"expected comma-separated distinct reasoning-gym task names, got {value!r}")
    known = reasoning_gym_tasks()
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"unknown reasoning-gym task {task!r}: {hint}tasks: {', '.join(known)}")
    return tasks


def reasoning_gym_tasks() -> list[str]:
    """The registered reasoning-gym task names, sorted."""
    return sorted(_reasoning_gym().factory.DATASETS)
