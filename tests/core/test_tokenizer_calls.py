"""transformers' tokenizer call conventions, each against transformers' own tokenizer over the same files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.helpers import tiny_model_dir
from unsloth_core.tokenizer import Tokenizer

TEXTS = ["hi", "hello there", "a somewhat longer text, with punctuation!"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    directory = tiny_model_dir(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(directory)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


CALLS: list[dict[str, Any]] = [
    {}, {"return_tensors": "pt"}, {"padding": True}, {"padding": True, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 50, "return_tensors": "pt"}, {"padding": True, "padding_side": "left"},
    {"truncation": True, "max_length": 4}, {"add_special_tokens": False, "return_attention_mask": False},
    {"padding": True, "pad_to_multiple_of": 8, "return_tensors": "pt"},
]


@pytest.mark.parametrize("kwargs", CALLS)
def test_call_matches_transformers(pair: tuple[Tokenizer, Any], kwargs: dict[str, Any]) -> None:
    ours, theirs = pair
    ragged_ok = "padding" in kwargs or "return_tensors" not in kwargs  # else both refuse a ragged batch
    for text in (TEXTS, TEXTS[1]) if ragged_ok else (TEXTS[1],):
        a, b = ours(text, **kwargs), theirs(text, **kwargs)
        assert set(a) == set(b), kwargs
        for key in a:
            assert same(a[key], b[key]), (kwargs, key, a[key], b[key])


def test_settable_padding_side_pad_token_and_to(pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = pair
    ours.padding_side = "left"
    try:
        enc = ours(TEXTS[:2], padding=True, return_tensors="pt").to("cpu")
        assert enc.input_ids[0, 0].item() == ours.pad_token_id and enc.attention_mask[0, 0].item() == 0
    finally:
        ours.padding_side = "right"
    old = ours.pad_token
    ours.pad_token = ours.eos_token
    try:
        assert ours(TEXTS[:2], padding=True)["input_ids"][0][-1] == ours.eos_token_id
    finally:
        ours.pad_token = old


@pytest.mark.parametrize("kwargs", [
    {"tokenize": False}, {"tokenize": False, "add_generation_prompt": True},
    {"add_generation_prompt": True, "return_dict": False},
    {"add_generation_prompt": True, "return_tensors": "pt", "return_dict": False},
    {"add_generation_prompt": True, "return_tensors": "pt", "return_dict": True},
])
def test_apply_chat_template_matches_transformers(pair: tuple[Tokenizer, Any], kwargs: dict[str, Any]) -> None:
    ours, theirs = pair
    for conversation in (CHAT, [CHAT, CHAT[1:2]]):
        extra = {"padding": True} if conversation is not CHAT and kwargs.get("return_tensors") else {}
        a, b = ours.apply_chat_template(conversation, **kwargs, **extra), theirs.apply_chat_template(
            conversation, **kwargs, **extra)
        if kwargs.get("return_dict"):
            assert all(same(a[k], b[k]) for k in ("input_ids", "attention_mask")), kwargs
        else:
            assert same(a, b), (kwargs, a, b)


def test_decode_and_batch_decode_match_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = pair
    batch = theirs(TEXTS, padding=True, return_tensors="pt").input_ids
    chat = torch.tensor(theirs.apply_chat_template(CHAT, return_dict=False))
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == theirs.batch_decode(batch,
                                                                                         skip_special_tokens=skip)
        assert ours.decode(chat, skip_special_tokens=skip) == theirs.decode(chat, skip_special_tokens=skip)
    assert ours.decode(int(chat[0])) == theirs.decode(int(chat[0]))


def test_unsupported_arguments_are_named(pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = pair
    with pytest.raises(TypeError, match="return_offsets_mapping"):
        ours("hi", return_offsets_mapping=True)
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        ours("hi", return_tensors="tf")
    with pytest.raises(ValueError, match="padding=True"):
        ours(TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match="padding='sideways'"):
        ours(TEXTS, padding="sideways")
    with pytest.raises(ValueError, match="continue_final_message"):
        ours.apply_chat_template(CHAT, continue_final_message=True)
    with pytest.raises(TypeError, match="spaces_between_special_tokens"):
        ours.decode([1, 2], spaces_between_special_tokens=False)


def test_sentencepiece_truncation_left(tmp_path: Path) -> None:
    """truncation_side="left" keeps the end of the text (what a chat prompt that is too long needs)."""
    ours = Tokenizer.from_dir(tiny_model_dir(tmp_path))
    ours.truncation_side = "left"
    assert ours("hello there", truncation=True, max_length=3)["input_ids"] == ours.encode("hello there")[-3:]
