"""teacher_data: a model's own answers as records, written resumably (OUT.partial, then OUT)."""

import json

import pytest

from m1_plugins.eval.generate import HFGenerator
from m1_plugins.teacher_data import generate_answers, partial_path, read_answers, settings_path, write_answers


def problems(n: int) -> list[tuple[list[dict], str]]:
    """n short prompts with their answers, as m1_plugins.data.reasoning_gym_problems returns them."""
    return [([{"role": "user", "content": f"What is {i} + {i + 1}?"}], str(2 * i + 1)) for i in range(n)]


class Interrupted(Exception):
    pass


class StopsAfter(HFGenerator):
    """HFGenerator that raises (as a Ctrl-C would) on the call after `calls` calls."""

    def __init__(self, *args, calls: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = calls

    def generate(self, *args, **kwargs):
        if self.calls == 0:
            raise Interrupted
        self.calls -= 1
        return super().generate(*args, **kwargs)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records(tiny_model, tiny_tokenizer):
    model = tiny_model()
    records = generate_answers(model, tiny_tokenizer, problems(3), max_new_tokens=6, batch_size=2, chunk_size=2,
                               progress=False)
    assert [r["messages"][0] for r in records] == [p[0][0] for p in problems(3)]
    for record, (_, gold) in zip(records, problems(3)):
        assert list(record) == ["messages", "answer", "finished"] and record["answer"] == gold
        assert record["messages"][1]["role"] == "assistant" and "<|im_end|>" not in record["messages"][1]["content"]
        assert isinstance(record["finished"], bool)
    # the engine (default) and HF generate give the same greedy answers
    hf = generate_answers(model, tiny_tokenizer, problems(3), max_new_tokens=6, generator="hf", progress=False)
    assert hf == records


def test_an_interrupted_run_resumes_after_its_last_chunk(tiny_model, tiny_tokenizer, tmp_path):
    model, out = tiny_model(), tmp_path / "answers.jsonl"
    options = dict(max_new_tokens=5, batch_size=2, chunk_size=2, progress=False)
    reference = generate_answers(model, tiny_tokenizer, problems(5), generator="hf", **options)

    interrupted = StopsAfter(model, pad_token_id=0, eos_token_ids=[2], calls=1)
    with pytest.raises(Interrupted):
        write_answers(model, tiny_tokenizer, problems(5), out, generator=interrupted, **options)
    assert not out.exists() and read_lines(partial_path(out)) == reference[:2]  # one chunk on disk
    with partial_path(out).open("a") as f:
        f.write('{"messages": [{"ro')  # a line torn by the interruption

    # other settings are refused (naming what differs); the same ones continue after the chunk on disk
    with pytest.raises(ValueError, match="max_new_tokens: 5 there, 6 now"):
        write_answers(model, tiny_tokenizer, problems(5), out, generator="hf", **{**options, "max_new_tokens": 6})
    counting = StopsAfter(model, pad_token_id=0, eos_token_ids=[2], calls=2)
    records = write_answers(model, tiny_tokenizer, problems(5), out, generator=counting, **options)
    assert counting.calls == 0  # exactly the two missing chunks were generated
    assert records == reference and read_lines(out) == reference  # no duplicates, in order, nothing torn
    assert not partial_path(out).exists() and not settings_path(partial_path(out)).exists()
    assert json.loads(settings_path(out).read_text())["max_new_tokens"] == 5
    assert read_answers(out, problems(5), json.loads(settings_path(out).read_text())) == reference

    with pytest.raises(FileExistsError, match="--overwrite"):
        write_answers(model, tiny_tokenizer, problems(5), out, **options)
    with pytest.raises(ValueError, match="answer 1 is to another prompt"):
        read_answers(out, problems(6)[1:])


def test_import_is_framework_free():
    """teacher_data and the shared tokenizer check load neither Axolotl nor VeRL (the axolotl trainer imports them)."""
    import subprocess
    import sys

    code = ("import sys, m1_plugins.teacher_data, m1_plugins.fidelity, m1_plugins.utils\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('axolotl', 'verl', 'vllm')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
