"""Small helpers shared by the command-line tools."""

import contextlib
import shutil
import tempfile
from pathlib import Path


def refuse_existing(out_dir, overwrite: bool = False) -> None:
    """Fail early (before any expensive work) when `out_dir` exists and may not be replaced."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another path or pass --overwrite to replace it.")


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yield a temporary directory next to `out_dir`; move it into place only if the block succeeds.

    A crash (or Ctrl-C) never leaves a half-written `out_dir`. An existing `out_dir` is refused unless
    `overwrite`, and is replaced only after the new one is complete.
    """
    refuse_existing(out_dir, overwrite)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_same_tokenizer(teacher_path, tokenizer) -> None:
    """Refuse (ValueError, one line) a student tokenizer whose vocabulary differs from the teacher's: token-level
    comparisons (distillation, fidelity) pair the two models' distributions id by id."""
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    if teacher_vocab != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher at {teacher_path} uses a different tokenizer than the student ({len(teacher_vocab)} vs "
            f"{len(tokenizer.get_vocab())} tokens, or different ids). Token-level distillation needs one vocabulary: "
            "convert the student from this teacher (m1 convert) or give it the teacher's tokenizer (Axolotl: "
            "`tokenizer_config`).")
