"""Tokenizer and chat template from a model directory's own files (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`), through the `tokenizers` library and a sandboxed jinja2, as transformers renders them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from unsloth_core.errors import ModelFormatError

Message = dict[str, Any]


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids, plus the model's chat template. Mirrors the parts of transformers' API users call."""

    def __init__(self, backend: HFTokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token")) or self.eos_token
        self.unk_token = _token_text(self.config.get("unk_token"))
        self._extra_eos = list(eos_token_ids)

    # ---- loading and saving ----

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise ModelFormatError(f"no tokenizer.json in {directory}; the model directory needs its tokenizer files")
        try:
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
            raise ModelFormatError(f"cannot read {directory / 'tokenizer.json'}: {e}") from None
        config = _read_json(directory / "tokenizer_config.json")
        template = None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        gen = _read_json(directory / "generation_config.json")
        eos = gen.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, config, template, eos_ids)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    # ---- ids ----

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS and generation_config.json's."""
        ids = [i for i in [self.eos_token_id, *self._extra_eos] if i is not None]
        return list(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_chars(self) -> int:
        """The longest token's text in the vocabulary: no text of N tokens is longer than N times this (a byte-level
        vocabulary spells each byte as one character; a byte fallback as more), so a prompt longer than that for the
        context can be refused without tokenizing it."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ---- text ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """transformers-style: {"input_ids": [...], "attention_mask": [...]} (lists of lists for a batch)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = self.encode_batch(text, add_special_tokens)
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}

    # ---- chat ----

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ModelFormatError("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> str | list[int]:
        """Render messages with the model's template; token ids by default, as transformers does."""
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        text = self.apply_chat_template(messages, add_generation_prompt, tokenize=False, **kwargs)
        assert isinstance(text, str)
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    A token can end in the middle of a UTF-8 sequence (byte-level BPE); decoding it alone gives U+FFFD. We keep a
    few tokens of context and emit text only once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from here, for context (leading-space handling differs mid-sequence)
        self.read_offset = 0  # text up to here has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = dec(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end) once generation stops."""
        dec = self.tokenizer.decode
        rest = dec(self.ids[self.prefix_offset:], self.skip)[len(dec(self.ids[self.prefix_offset:self.read_offset],
                                                                      self.skip)):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest
