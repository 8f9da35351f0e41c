"""Offline datasets: reasoning-gym tasks rendered as chat conversations with the M1 prompt suffix."""

M1_PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
DATA_INSTALL = 'pip install "m1-plugins[data]"'


def reasoning_gym_conversations(task: str = "gsm_symbolic", size: int = 64, seed: int = 0) -> list[list[dict]]:
    """`size` problems of a reasoning-gym task as [user, assistant] messages.

    The user turn is the question plus the paper's suffix; the assistant turn is the task's worked
    solution when it has one (`metadata.answer_cot`), ending with the answer in \\boxed{}.
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"reasoning-gym is needed for offline task data. Install: {DATA_INSTALL}") from err
    conversations = []
    for item in reasoning_gym.create_dataset(task, size=size, seed=seed):
        solution = item["metadata"].get("answer_cot") or ""
        answer = f"{solution}\nThe final answer is \\boxed{{{item['answer']}}}.".strip()
        conversations.append([
            {"role": "user", "content": f"{item['question']}\n{M1_PROMPT_SUFFIX}"},
            {"role": "assistant", "content": answer},
        ])
    return conversations
