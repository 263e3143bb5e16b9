"""SFT tokenisation: which tokens get loss, checked token by token (tiny ChatML tokenizer and SmolLM2's own)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.data.conftest import trained_runs
from tests.helpers import CHATML, make_llama3_like_tokenizer, make_tiny_tokenizer
from unsloth_core.data.examples import ChatExample, CompletionExample, TextExample
from unsloth_core.data.formats import parse_row
from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample, tokenize_sft
from unsloth_core.errors import DataFormatError
from unsloth_core.tokenizer import Tokenizer


def conversation(*turns: tuple[str, str], weights: dict[int, int] | None = None) -> ChatExample:
    messages: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in turns]
    for i, w in (weights or {}).items():
        messages[i]["weight"] = w
    _, example = parse_row({"messages": messages})
    assert isinstance(example, ChatExample)
    return example


CONVERSATION = (("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))


def test_ignore_index_matches_the_kernels() -> None:
    from unsloth_core.kernels import IGNORE_INDEX as KERNEL_IGNORE_INDEX

    assert IGNORE_INDEX == KERNEL_IGNORE_INDEX


def test_chat_loss_on_assistant_content_and_end_of_turn_only(tiny_tokenizer: Tokenizer) -> None:
    out = tokenize_sft(conversation(*CONVERSATION), tiny_tokenizer, None)
    assert out.input_ids == tiny_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in CONVERSATION])
    # not the `<|im_start|>assistant\n` header, not the newline after <|im_end|>
    assert trained_runs(tiny_tokenizer, out) == ["A1<|im_end|>", "A2<|im_end|>"]
    assert out.n_loss_tokens == 6 and not out.truncated


def test_weight_zero_turns_get_no_loss(tiny_tokenizer: Tokenizer) -> None:
    out = tokenize_sft(conversation(*CONVERSATION, weights={2: 0}), tiny_tokenizer, None)
    assert trained_runs(tiny_tokenizer, out) == ["A2<|im_end|>"]
    out = tokenize_sft(conversation(*CONVERSATION, weights={2: 1, 4: 0}), tiny_tokenizer, None)
    assert trained_runs(tiny_tokenizer, out) == ["A1<|im_end|>"]


def test_train_on_inputs_trains_everything_but_weight_zero_turns(tiny_tokenizer: Tokenizer) -> None:
    out = tokenize_sft(conversation(*CONVERSATION), tiny_tokenizer, None, train_on_inputs=True)
    assert out.labels == out.input_ids
    out = tokenize_sft(conversation(*CONVERSATION, weights={2: 0}), tiny_tokenizer, None, train_on_inputs=True)
    assert trained_runs(tiny_tokenizer, out) == [
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n",
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    ]


def test_prompt_completion_and_text(tiny_tokenizer: Tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    out = tokenize_sft(CompletionExample("2+2=", " 4"), tiny_tokenizer, None)
    assert out.input_ids == [*tiny_tokenizer.encode("2+2= 4"), eos]
    assert trained_runs(tiny_tokenizer, out) == [" 4<|im_end|>"]
    out = tokenize_sft(CompletionExample("2+2=", " 4"), tiny_tokenizer, None, train_on_inputs=True)
    assert out.labels == out.input_ids
    out = tokenize_sft(TextExample("hello"), tiny_tokenizer, None)
    assert out.input_ids == [*tiny_tokenizer.encode("hello"), eos] and out.labels == out.input_ids


def test_truncation_keeps_the_start_and_flags_it(tiny_tokenizer: Tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    assert eos is not None
    full = tokenize_sft(TextExample("abcdefghij"), tiny_tokenizer, None)
    cut = tokenize_sft(TextExample("abcdefghij"), tiny_tokenizer, 4)
    assert cut == TokenizedExample(full.input_ids[:4], full.labels[:4], truncated=True)
    short = tokenize_sft(TextExample("abc"), tiny_tokenizer, 4)  # 3 bytes + EOS fit exactly
    assert short == TokenizedExample([*full.input_ids[:3], eos], [*full.labels[:3], eos])


def test_another_template_family() -> None:
    # Nothing assumes ChatML: with Llama 3's template the end-of-turn token is <|eot_id|> and nothing follows it.
    tokenizer = make_llama3_like_tokenizer()
    out = tokenize_sft(conversation(*CONVERSATION), tokenizer, None)
    assert tokenizer.decode(out.input_ids[:1]) == "<|begin_of_text|>"
    assert trained_runs(tokenizer, out) == ["A1<|eot_id|>", "A2<|eot_id|>"]
    out = tokenize_sft(conversation(*CONVERSATION, weights={2: 0}), tokenizer, None, train_on_inputs=True)
    assert tokenizer.decode(out.input_ids).count("A1") == 1 and "A1" not in "".join(trained_runs(tokenizer, out))


def test_template_that_is_not_prefix_stable_falls_back_to_search() -> None:
    # Marks the last message specially, so rendering messages[:i] is not a prefix of the whole rendering.
    template = CHATML.replace("'<|im_end|>\n'", "'<|im_end|>' + ('' if loop.last else '\n')")
    tokenizer = make_tiny_tokenizer(template)
    out = tokenize_sft(conversation(*CONVERSATION, weights={2: 0}), tokenizer, None)
    assert trained_runs(tokenizer, out) == ["A2<|im_end|>"]


def test_template_refusal_is_a_data_error() -> None:
    tokenizer = make_tiny_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataFormatError, match="roles must alternate"):
        tokenize_sft(conversation(("user", "q"), ("assistant", "a")), tokenizer, None)


# ---- the real SmolLM2 template (ChatML, with a default system prompt when there is none) ----

@pytest.mark.slow
def test_smollm_labels_token_by_token(smol_tokenizer: Tokenizer) -> None:
    tok = smol_tokenizer
    example = conversation(("user", "What is the capital of Zorbania?"), ("assistant", "Quillfort."),
                           ("user", "And its currency?"), ("assistant", "The zorb."), weights={1: 0})
    out = tokenize_sft(example, tok, None)

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    pieces: list[tuple[str, bool]] = [
        (f"<|im_start|>system\n{default_system}<|im_end|>\n", False),
        ("<|im_start|>user\nWhat is the capital of Zorbania?<|im_end|>\n", False),
        ("<|im_start|>assistant\nQuillfort.<|im_end|>\n", False),  # weight 0
        ("<|im_start|>user\nAnd its currency?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),  # the header the model is given
        ("The zorb.", True),
        ("<|im_end|>", True),  # the model must learn to stop
        ("\n", False),
    ]
    expected_ids = [i for text, _ in pieces for i in enc(text)]
    expected_labels = [i if train else IGNORE_INDEX for text, train in pieces for i in enc(text)]
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert out.input_ids == tok.apply_chat_template([m.to_template() for m in example.messages])


@pytest.mark.slow
def test_smollm_system_prompt_and_train_on_inputs(smol_tokenizer: Tokenizer) -> None:
    example = conversation(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    out = tokenize_sft(example, smol_tokenizer, None)
    assert trained_runs(smol_tokenizer, out) == ["Hello!<|im_end|>"]
    assert "SmolLM" not in smol_tokenizer.decode(out.input_ids)  # a given system prompt replaces the default
    assert tokenize_sft(example, smol_tokenizer, None, train_on_inputs=True).labels == out.input_ids
    cut = tokenize_sft(example, smol_tokenizer, len(out) - 2)
    assert cut.truncated and trained_runs(smol_tokenizer, cut) == ["Hello!"]  # cut before <|im_end|>


@pytest.mark.slow
def test_smollm_prompt_completion(smol_tokenizer: Tokenizer) -> None:
    out = tokenize_sft(CompletionExample("The capital of Zorbania is", " Quillfort."), smol_tokenizer, None)
    assert trained_runs(smol_tokenizer, out) == [" Quillfort.<|im_end|>"]
