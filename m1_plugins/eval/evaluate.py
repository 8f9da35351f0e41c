"""Sample, grade and record: the loop behind `m1 eval`, resumable problem by problem."""

import time
from pathlib import Path

from tqdm.auto import tqdm

from .benchmarks import Problem, chat_prompt
from .generate import Generator
from .grading import answers_equal, box_token_spans, find_boxes
from .results import append_records, read_records, read_timing, write_timing


def grade_sample(problem: Problem, sample: int, token_ids: list[int], tokenizer, eos_token_ids: list[int]) -> dict:
    """The record of one generated sample (field list in results.py): decoded, boxes located and graded."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    response = decode(token_ids)
    boxes = find_boxes(response)
    spans = box_token_spans(boxes, token_ids, decode)
    graded = [[start, end, box.content, box.content is not None and answers_equal(problem.answer, box.content)]
              for box, (start, end) in zip(boxes, spans)]
    answer, correct = (graded[-1][2], graded[-1][3]) if graded else (None, False)
    return {"benchmark": problem.benchmark, "problem_id": problem.problem_id, "sample": sample, "gold": problem.answer,
            "response": response, "answer": answer, "correct": correct, "tokens": len(token_ids),
            "finished": bool(token_ids) and token_ids[-1] in eos_token_ids, "boxes": graded}


def evaluate_model(generator: Generator, tokenizer, eos_token_ids: list[int], problems: list[Problem], model_dir: Path,
                   n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int, batch_size: int,
                   label: str = "") -> list[dict]:
    """Sample n responses per problem, grade them and append them to model_dir/samples.jsonl, skipping
    problems already complete there. Problems go to the generator in chunks of batch_size // n (at least
    one, never mixing benchmarks); a chunk's seed is `seed` + the index of its first problem. timing.json
    accumulates generation seconds per benchmark and the loop's wall time (model loading excluded).
    Returns every record of the run (old and new)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(model_dir, n)
    done = {(r["benchmark"], r["problem_id"]) for r in records}
    timing = read_timing(model_dir)
    wall_before, start = timing["wall_seconds"], time.perf_counter()
    tokens_before, seconds_before = generator.tokens_generated, generator.seconds
    with tqdm(total=len(problems) * n, initial=len(done) * n, desc=f"eval {label}", unit="sample") as bar:
        for first, batch in _chunks(problems, done, max(1, batch_size // n)):
            generation_start = generator.seconds
            outputs = generator.generate([chat_prompt(tokenizer, p) for p in batch], n, temperature, top_p,
                                         max_new_tokens, seed + first)
            new = [grade_sample(p, s, ids, tokenizer, eos_token_ids) for p, samples in zip(batch, outputs)
                   for s, ids in enumerate(samples)]
            append_records(model_dir, new)
            records.extend(new)
            seconds = timing["generation_seconds"]
            seconds[batch[0].benchmark] = seconds.get(batch[0].benchmark, 0.0) + generator.seconds - generation_start
            timing["wall_seconds"] = wall_before + time.perf_counter() - start
            write_timing(model_dir, timing)
            bar.update(len(new))
            elapsed = max(generator.seconds - seconds_before, 1e-9)
            bar.set_postfix(tok_s=f"{(generator.tokens_generated - tokens_before) / elapsed:.1f}")
    return records


def _chunks(problems: list[Problem], done: set, size: int) -> list[tuple[int, list[Problem]]]:
    """(index of the first problem, up to `size` problems not done yet, all of one benchmark), in order."""
    chunks: list[tuple[int, list[Problem]]] = []
    for i, p in enumerate(problems):
        if (p.benchmark, p.problem_id) in done:
            continue
        if chunks and len(chunks[-1][1]) < size and chunks[-1][1][-1].benchmark == p.benchmark:
            chunks[-1][1].append(p)
        else:
            chunks.append((i, [p]))
    return chunks
