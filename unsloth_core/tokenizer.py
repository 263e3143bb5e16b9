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

from unsloth_core.batch_encoding import (
    PADDING,
    SIDES,
    TRUNCATION,
    BatchEncoding,
    as_tensors,
    check_choice,
    one_row,
    pad,
    rows_of,
    truncate,
)
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
        self._chat_template = chat_template or self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token")) or self.eos_token
        self.unk_token = _token_text(self.config.get("unk_token"))
        self._extra_eos = list(eos_token_ids)
        # transformers' settable attributes: which side `padding=True` and `truncation=True` work on.
        self.padding_side = self.config.get("padding_side", "right")
        self.truncation_side = self.config.get("truncation_side", "right")

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
        config = {k: v for k, v in self.settings().items() if k != "chat_template"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    def settings(self) -> dict[str, Any]:
        """tokenizer_config.json's contents as they stand: the special tokens and sides set on this object (as
        transformers lets a notebook set `tokenizer.pad_token = ...`) over the file's values."""
        current = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                   "unk_token": self.unk_token, "padding_side": self.padding_side,
                   "truncation_side": self.truncation_side, "chat_template": self.chat_template}
        as_read = Tokenizer(self.backend, self.config)  # what the file alone gives: only changes are written
        return {**self.config, **{k: v for k, v in current.items() if v != getattr(as_read, k)}}

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._chat_template = value
        self.__dict__.pop("_template", None)  # compiled from the old text

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

    def decode(self, ids: int | Sequence[int] | Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of one sequence of ids (a list, a 1-D tensor or one id), as transformers' `decode`."""
        _check_decode_kwargs(kwargs)
        return self.backend.decode(one_row(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False,
                     **kwargs: Any) -> list[str]:
        """Text of each row of a (B, T) tensor or a list of id lists."""
        _check_decode_kwargs(kwargs)
        return self.backend.decode_batch(rows_of(sequences), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], text_pair: Any = None, *, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 padding_side: str | None = None, pad_to_multiple_of: int | None = None,
                 return_token_type_ids: bool | None = None, **kwargs: Any) -> BatchEncoding:
        """transformers' call: `input_ids` and `attention_mask` for a text or a batch, padded (`padding=True` to
        the longest, `"max_length"`), truncated (to `max_length`, default the model's), as lists or, with
        `return_tensors="pt"`, (B, T) tensors."""
        if kwargs:
            raise TypeError(f"Tokenizer.__call__ got unsupported argument(s): {', '.join(sorted(kwargs))}")
        if text_pair is not None:
            raise ValueError("text_pair is not supported: Llama tokenizers encode one text per row")
        if return_token_type_ids:
            raise ValueError("return_token_type_ids=True is not supported: Llama models take no token type ids")
        batched = not isinstance(text, str)
        if batched and not all(isinstance(t, str) for t in text):
            raise TypeError("Tokenizer.__call__ takes a string or a list of strings")
        rows = self.encode_batch([text] if isinstance(text, str) else text, add_special_tokens)
        if check_choice("truncation", truncation or False, TRUNCATION):
            rows = truncate(rows, max_length or self.model_max_length, self.truncation_side)
        side = check_choice("padding_side", padding_side or self.padding_side, dict(zip(SIDES, SIDES)))
        mode = check_choice("padding", padding, PADDING)
        masks = [[1] * len(r) for r in rows]
        if mode is not None:
            rows, masks = pad(rows, mode, max_length, self.pad_token_id, side, pad_to_multiple_of)
        data = {"input_ids": rows}
        if return_attention_mask is not False:
            data["attention_mask"] = masks
        return BatchEncoding(as_tensors(data, return_tensors, batched))

    @property
    def model_max_length(self) -> int | None:
        value = self.config.get("model_max_length")
        return int(value) if isinstance(value, int | float) and value < 1e12 else None  # HF writes 1e30 for "none"

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

    def apply_chat_template(self, conversation: Sequence[Message] | Sequence[Sequence[Message]],
                            tools: Sequence[Any] | None = None, *, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = False, **kwargs: Any) -> Any:
        """Render messages with the model's template: token ids by default (a list; a (1, T) tensor with
        `return_tensors="pt"`; the `tokenizer(...)` mapping with `return_dict=True`), the text with
        `tokenize=False`. A list of conversations gives one row each. Other keyword arguments reach the template
        (`enable_thinking=...`), as in transformers.

        `return_dict` defaults to False as in transformers 4, which is what Unsloth's notebooks are written for
        (`model.generate(input_ids=tokenizer.apply_chat_template(..., return_tensors="pt"))`); transformers 5
        defaults it to True, and `model.generate` takes that mapping as `input_ids` too."""
        if continue_final_message:
            raise ValueError("continue_final_message=True is not supported; render with tokenize=False and cut "
                             "the text after the last message instead")
        batched = bool(conversation) and not isinstance(conversation[0], dict)
        conversations = list(conversation) if batched else [conversation]
        extra = {"tools": list(tools)} if tools is not None else {}
        texts = [self._template.render(messages=list(c), add_generation_prompt=add_generation_prompt,
                                       bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                       **extra, **kwargs) for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        encoded = self(texts if batched else texts[0], add_special_tokens=False,
                       padding=padding, truncation=truncation, max_length=max_length, return_tensors=return_tensors)
        return encoded if return_dict else encoded["input_ids"]

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                        **kwargs)
        assert isinstance(text, str)
        return text


def _check_decode_kwargs(kwargs: dict[str, Any]) -> None:
    """transformers' decode options we honour by default; anything else is refused by name."""
    if kwargs.get("clean_up_tokenization_spaces"):
        raise ValueError("clean_up_tokenization_spaces=True is not supported (the text is decoded as the "
                         "tokenizer's decoder writes it)")
    unknown = set(kwargs) - {"clean_up_tokenization_spaces"}
    if unknown:
        raise TypeError(f"decode got unsupported argument(s): {', '.join(sorted(unknown))}")


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
