"""`m1 generate`: chat with an M1 checkpoint (or a Llama) through the generation engine (a quick look at what a
model does)."""

import json
import time
from pathlib import Path

import click


@click.command("generate")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="M1 or Llama checkpoint directory (with tokenizer and chat template); a Llama runs as its "
                   "all-attention M1 conversion, as in `m1 eval`.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A user message; repeat for several.")
@click.option("--n", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per prompt (one prefill).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is off.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, help="Make the samples reproducible.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None, help="Default: bfloat16 on GPU, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt (tokens, log-probs, finish reason).")
def generate_command(model_dir, prompts, n, temperature, top_p, top_k, max_tokens, seed, dtype, device, as_json):
    """Generate answers to chat prompts with the M1 engine and print them with tokens/s."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..cli import _device, _dtype
    from ..eval.generate import engine_for
    from ..utils import check_checkpoint
    from .sampling import SamplingParams

    device = _device(device)
    dtype = _dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    check_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [i if isinstance(i, list) else i["input_ids"] for i in ids]
    max_len = max(map(len, ids)) + max_tokens
    limit = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    if max_len > limit:  # refused before the model is loaded: a longer sequence leaves the positions it was trained on
        raise click.BadParameter(f"the longest prompt ({max_len - max_tokens} tokens) + --max-tokens ({max_tokens}) "
                                 f"exceeds the model's max length ({limit} tokens): shorten the prompt or lower "
                                 "--max-tokens.", param_hint="--prompt")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    engine = engine_for(model, len(ids) * n, max_len)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, n=n, seed=seed)
    start = time.perf_counter()
    outputs = engine.generate(ids, sampling)
    seconds = time.perf_counter() - start
    for prompt, output in zip(prompts, outputs):
        if output.error:
            raise click.ClickException(f"{prompt!r}: {output.error}")
        for i, sample in enumerate(output.samples):
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            if as_json:
                click.echo(json.dumps({"prompt": prompt, "sample": i, "text": text, "token_ids": sample.token_ids,
                                       "logprobs": sample.logprobs, "finish_reason": sample.finish_reason}))
            else:
                click.echo(f"--- {prompt} [sample {i}, {len(sample.token_ids)} tokens, {sample.finish_reason}]\n{text}")
    tokens = sum(len(s.token_ids) for o in outputs for s in o.samples)
    click.echo(f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s, {device}, {dtype})", err=True)
