"""Answer extraction (the last \\boxed{...}) and grading with math-verify.

Rules:
- The answer of a response is the content of its *last* `\\boxed{` (nested braces matched). If that last
  box never closes (a response cut off at the length limit), the response has no answer: an earlier,
  closed box does not stand in for it. A response without any box has no answer (`None`); it is graded
  incorrect and counted apart (the no-box fraction), never silently folded into the accuracy.
- Answers and ground truths are compared by math-verify (`verify(parse(gold), parse(answer))`), both
  parsed as inline LaTeX (`$...$`), so `\\dfrac{1}{2}`, `\\frac12`, `1/2` and `0.5` are equal, as are
  `(-\\infty, 3]` and `(-\\infty,3]`, `x=3` and `3`, `10\\%` and `10`. A string math-verify cannot parse (the
  empty `\\boxed{}`, free text) equals only the same string (whitespace-stripped).
"""

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

BOX_OPEN = "\\boxed{"
# a number as written in prose: a sign (not the minus of "5-3"), thousands separators, decimals ("-1,234.5")
NUMBER = re.compile(r"(?<![\d)])-?\d+(?:,\d{3})*(?:\.\d+)?")
EVAL_INSTALL = 'pip install "m1-plugins[eval]"'


@dataclass(frozen=True)
class Box:
    """One `\\boxed{` occurrence in a text. Character offsets: `start` at the backslash, `end` one past the
    closing brace (None when the box never closes). `content` is the text inside (None when unclosed)."""

    start: int
    end: int | None
    content: str | None


class Grade(NamedTuple):
    """answer: content of the last box, None without a (closed) last box; correct: math-verify's verdict."""

    answer: str | None
    correct: bool


def find_boxes(text: str) -> list[Box]:
    """Every `\\boxed{...}` in `text`, in order, with brace nesting (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`)."""
    boxes = []
    start = text.find(BOX_OPEN)
    while start != -1:
        depth, i = 1, start + len(BOX_OPEN)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # ran off the end of the text: the box never closes
            boxes.append(Box(start, None, None))
        else:
            boxes.append(Box(start, i, text[start + len(BOX_OPEN):i - 1]))
        start = text.find(BOX_OPEN, start + len(BOX_OPEN))
    return boxes


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`; None without a box or when the last box is unclosed."""
    boxes = find_boxes(text)
    return boxes[-1].content if boxes else None


def final_answer(text: str) -> str | None:
    """A lenient final answer: the last `\\boxed{...}` (as `extract_boxed`) or, when the text has no closed last box
    (a small model often states its answer without one, or is cut inside it), the last number in the text,
    thousands separators removed. None when there is neither."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise ImportError(f"Grading needs math-verify. Install: {EVAL_INSTALL}") from err
    return math_verify


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text


@functools.lru_cache(maxsize=65536)
def parse_answer(text: str) -> tuple:
    """math-verify's parse of an answer string as inline LaTeX; () when it cannot parse it. Cached."""
    return tuple(_math_verify().parse(f"${_strip_dollars(text)}$"))


@functools.lru_cache(maxsize=65536)
def answers_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence of two answer strings; exact (stripped) string equality when either is unparseable."""
    parsed_gold, parsed_answer = parse_answer(gold), parse_answer(answer)
    if not parsed_gold or not parsed_answer:
        return _strip_dollars(gold) == _strip_dollars(answer)
    return bool(_math_verify().verify(list(parsed_gold), list(parsed_answer)))


def grade(response: str, gold: str) -> Grade:
    """Grade one response against the ground truth `gold` (a LaTeX or plain answer string)."""
    answer = extract_boxed(response)
    return Grade(answer, answer is not None and answers_equal(gold, answer))


def box_token_spans(boxes: list[Box], token_ids: list[int], decode: Callable[[list[int]], str]) -> list[tuple[int, int | None]]:
    """For each box of `decode(token_ids)`, the number of leading tokens needed to contain its `\\boxed{`
    opener and its closing brace: (start_tokens, end_tokens or None when unclosed).

    A response truncated to L tokens has, as its last box, the last box with start_tokens <= L, which is
    closed iff end_tokens <= L. Found by binary search over decoded prefixes (byte-level BPE decodes a
    prefix of the ids to a prefix of the text).
    """

    def tokens_to_cover(n_chars: int) -> int:
        lo, hi = 1, len(token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(token_ids[:mid])) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    return [(tokens_to_cover(box.start + len(BOX_OPEN)), None if box.end is None else tokens_to_cover(box.end))
            for box in boxes]
