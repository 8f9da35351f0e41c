"""Small helpers shared by the command-line tools."""

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


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
    remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Remove the temporary siblings of `out_dir` that a killed run (kill -9, power loss) left behind: hundreds of
    MB each. A sibling whose writer (the pid in its name) is still running is left alone."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        logger.warning("removing %s (%.1f MB), left by an interrupted run", stale, size / 1e6)
        shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def exit_on_sigterm() -> None:
    """Turn SIGTERM (`kill`, a job scheduler's stop) into a normal exit, so that `finally` blocks (temporary
    directories, partial files) run as they do on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def check_checkpoint(model_dir) -> None:
    """Refuse, naming the file, a directory that is not a model checkpoint or whose safetensors are cut short, before
    any model is loaded (the loaders' own errors name neither)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a model checkpoint. Write one with `m1 teacher` "
                                "or `m1 convert`, or pass the directory that holds config.json.")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights and not any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir} has no weights (*.safetensors or *.bin): write the checkpoint again "
                                "(save_pretrained, `m1 convert`, `m1 teacher`).")
    for path in weights:
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """The file must be as long as its header says: a copy or write that was cut short fails here, by name."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(header_len, size)))  # a garbage length must not allocate exabytes
        expected = 8 + header_len + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                                        default=0)
    except (ValueError, KeyError, TypeError, IndexError):  # a header that is not the safetensors JSON
        expected = None
    if expected != size:
        raise ValueError(f"{path} is truncated or corrupted ({size:,} bytes"
                         + (f", its header describes {expected:,})" if expected else ", no valid header)")
                         + ": copy or write it again.")


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
