"""`m1_convert_from`: an Axolotl run that starts from a Transformer converts it into `base_model` first.

Runs in the plugin's `register` hook, before Axolotl loads the tokenizer and the datasets from `base_model`. Every
rank calls it; a file lock lets one convert (atomically) while the others wait, then all load the result. An
existing `base_model` is reused only if its conversion record matches the requested conversion.
"""

import json
from pathlib import Path

from filelock import FileLock

from ..convert import CONVERSION_RECORD, conversion_record, convert_hybrid_dir, spaced_attn_layers


def convert_on_load(cfg, log) -> None:
    from transformers import AutoConfig

    from .args import M1Args

    args = M1Args(**{k: v for k, v in cfg.items() if k.startswith("m1_")})  # the m1_ keys, validated now
    if not cfg.get("base_model"):
        raise ValueError("m1_convert_from needs base_model: the directory to write the converted hybrid to.")
    target = Path(cfg["base_model"])
    layers = args.m1_attn_layers or spaced_attn_layers(
        AutoConfig.from_pretrained(args.m1_convert_from).num_hidden_layers, args.m1_num_attn_layers)
    wanted = conversion_record(args.m1_convert_from, layers, args.m1_layout, args.m1_xb_expansion, args.m1_gate)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if target.exists():
            record = target / CONVERSION_RECORD
            found = json.loads(record.read_text()) if record.is_file() else None
            if found != wanted:
                raise ValueError(f"base_model {target} exists but is not the conversion m1_convert_from asks for "
                                 f"({found or 'no ' + CONVERSION_RECORD} vs {wanted}): remove it, or point base_model "
                                 "at a new directory.")
            log.info("m1_convert_from: reusing the conversion in %s", target)
            return
        log.info("m1_convert_from: converting %s into %s (attention layers %s)", args.m1_convert_from, target, layers)
        convert_hybrid_dir(args.m1_convert_from, target, attn_layers=layers, layout=args.m1_layout,
                           xb_expansion=args.m1_xb_expansion, gate=args.m1_gate)
