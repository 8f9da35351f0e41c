"""Fixtures of the fidelity tests: a tiny byte-level tokenizer with a ChatML template (no download, any text),
and tiny M1 models over its vocabulary saved as checkpoint directories."""

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE without merges: one token per byte, plus <|im_start|>, <|im_end|> (EOS) and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{c: i + 3 for i, c in enumerate(sorted(byte_chars))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_model(make_model, tiny_tokenizer):
    """Factory: tiny_model(seed=0, **overrides) -> a tiny M1ForCausalLM over the tiny tokenizer's vocabulary."""

    def make(seed=0, **overrides):
        kwargs = dict(vocab_size=len(tiny_tokenizer), max_position_embeddings=2048, eos_token_id=2, pad_token_id=0)
        return make_model(seed=seed, **{**kwargs, **overrides})

    return make


@pytest.fixture
def save_model(tiny_tokenizer):
    """save_model(model, path) -> path: a checkpoint directory with the tiny tokenizer."""

    def save(model, path):
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path

    return save

