"""Small things tests build in code: a byte-level tokenizer with a chat template, a tiny model directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from unsloth_core.checkpoint import save_model
from unsloth_core.config import LlamaConfig
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer

# ChatML without a default system prompt: every turn is `<|im_start|>role\ncontent<|im_end|>\n`.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Llama 3's shape: a BOS, headers between special tokens, `<|eot_id|>` ending each turn, no separator after it.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat_template: str = CHATML, bos_token: str = "<|im_start|>", eos_token: str = "<|im_end|>",
                        pad_token: str = "<|endoftext|>", specials: tuple[str, ...] = ()) -> Tokenizer:
    """One token per UTF-8 byte (a byte-level BPE with no merges) plus the special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(dict.fromkeys([pad_token, bos_token, eos_token, *specials])))
    config = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    return Tokenizer(backend, config, chat_template)


def make_llama3_like_tokenizer() -> Tokenizer:
    return make_tiny_tokenizer(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad|>",
                               ("<|start_header_id|>", "<|end_header_id|>"))




def tiny_model_dir(directory: Path, seed: int = 0, std: float = 0.02, **overrides: object) -> Path:
    """A saved tiny model (vocab 320 covers the tiny tokenizer's 259 ids) with its tokenizer files."""
    make_tiny_tokenizer().save_pretrained(directory / "tok")
    save_model(tiny_model(seed=seed, std=std, **overrides), directory / "model", tokenizer_dir=directory / "tok")
    return directory / "model"


def tiny_model(seed: int = 0, std: float = 0.5, **overrides: object) -> Llama:
    """A 2-layer GQA model with weights large enough that logits differ meaningfully between positions."""
    model = Llama(LlamaConfig.from_name("tiny", **overrides))
    model.init_weights(seed=seed, std=std)
    return model.eval()


def wait_until(condition: Callable[[], object], timeout: float = 30.0, poll: float = 0.005) -> None:
    """Poll until `condition()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)
