"""Unsloth's chat helpers: get_chat_template's formats and stop tokens, and standardize_sharegpt."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import pytest
import transformers

from tests.helpers import LLAMA3, make_llama3_like_tokenizer, make_tiny_tokenizer
from unsloth_core.chat_templates import CHAT_FORMATS, get_chat_template
from unsloth_core.sharegpt import standardize_sharegpt
from unsloth_core.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": " Hi "},
            {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"}]
LLAMA_3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def quiet(tokenizer: Tokenizer, name: str, **kwargs: object) -> Tokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_chat_template(tokenizer, name, **kwargs)  # type: ignore[arg-type]


def as_transformers(tokenizer: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=tokenizer.bos_token,
                                                eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                                                chat_template=tokenizer.chat_template)


@pytest.mark.parametrize("name", sorted(CHAT_FORMATS))
def test_every_format_renders_as_transformers_renders_it(name: str) -> None:
    ours = quiet(make_tiny_tokenizer(), name)
    theirs = as_transformers(ours)
    for conversation, prompt in ((CONVERSATION, True), (CONVERSATION[1:3], False), (CONVERSATION[1:2], True)):
        expected = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        assert ours.render_chat(conversation, add_generation_prompt=prompt) == expected


def test_formats_write_their_published_shapes() -> None:
    tok = make_tiny_tokenizer(bos_token="<s>", eos_token="</s>")
    render = {name: quiet(tok, name).render_chat(CONVERSATION[1:3]) for name in CHAT_FORMATS}
    assert render["chatml"] == "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert render["llama-3"] == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    assert render["llama-3.1"] == render["llama-3.2"] == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    assert render["alpaca"] == ("<s>Below is an instruction that describes a task. Write a response that "
                                "appropriately completes the request.\n\n### Instruction:\n Hi \n\n"
                                "### Response:\nHello.</s>\n\n")
    assert render["mistral"] == "<s>[INST]  Hi  [/INST]Hello.</s>"
    assert render["llama"] == "<s>[INST] Hi [/INST] Hello. </s>"
    assert render["zephyr"] == "<|user|>\n Hi </s>\n<|assistant|>\nHello.</s>\n"
    assert render["gemma"] == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    system = quiet(tok, "llama").render_chat(CONVERSATION[:2])
    assert system == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    dated = quiet(tok, "llama-3.1").render_chat(CONVERSATION[:1], date_string="01 Jan 2026")
    assert "Today Date: 01 Jan 2026\n\nBe brief.<|eot_id|>" in dated


def test_chatml_maps_its_end_of_turn_onto_the_eos_token() -> None:
    """A tokenizer without <|im_end|>: its EOS token is renamed, so the token the model ends texts with ends
    every reply, and the vocabulary keeps its size."""
    base = make_tiny_tokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>")
    eos_id = base.eos_token_id
    with pytest.warns(UserWarning, match="<|im_start|>"):
        chat = get_chat_template(base, "chatml")
    assert chat.eos_token == chat.pad_token == "<|im_end|>" and chat.eos_token_id == eos_id
    assert chat.encode("<|im_end|>", add_special_tokens=False) == [eos_id]
    assert chat.vocab_size == base.vocab_size and chat.eos_token_ids == [eos_id]
    assert base.eos_token == "<|end_of_text|>"  # the original is left as it was
    # SmolLM2's tokenizer already ends ChatML turns with its EOS: nothing to map, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = get_chat_template(make_tiny_tokenizer(), "chatml")
    assert (same.eos_token, same.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_gemma_maps_and_llama3_adds_a_stop_token() -> None:
    base = make_tiny_tokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>",
                               LLAMA_3_SPECIALS)
    llama = get_chat_template(base, "llama-3")  # a base Llama 3 tokenizer: EOS kept, <|eot_id|> also stops
    eot = base.token_to_id("<|eot_id|>")
    assert llama.eos_token == "<|end_of_text|>" and llama.eos_token_ids == [base.eos_token_id, eot]
    with pytest.warns(UserWarning, match="<start_of_turn>"):
        gemma = get_chat_template(make_llama3_like_tokenizer(), "gemma")
    assert gemma.eos_token == "<end_of_turn>" and gemma.pad_token == "<|finetune_right_pad|>"
    assert gemma.encode("<end_of_turn>", add_special_tokens=False) == [gemma.eos_token_id]
    with pytest.warns(UserWarning, match=r"<\|start_header_id\|>, <\|end_header_id\|>, <\|eot_id\|>"):
        get_chat_template(make_tiny_tokenizer(), "llama-3.1")  # SmolLM2-like: no Llama 3 tokens


def test_sharegpt_mapping_and_system_message() -> None:
    tok = make_tiny_tokenizer()
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    for name in ("chatml", "llama-3.1", "alpaca"):
        direct = quiet(tok, name, mapping=mapping).render_chat(SHAREGPT, add_generation_prompt=True)  # type: ignore
        assert direct == quiet(tok, name).render_chat(CONVERSATION, add_generation_prompt=True)
    system = quiet(tok, "chatml", system_message="You are kind.")
    assert system.render_chat(CONVERSATION[1:2]).startswith("<|im_start|>system\nYou are kind.<|im_end|>\n")
    assert system.render_chat(CONVERSATION[:1]) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert "You are kind.\n\n### Instruction" in quiet(tok, "alpaca", system_message="You are kind.").render_chat(
        CONVERSATION[1:2])


def test_refusals() -> None:
    tok = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown chat_template 'chatml3'; the formats are chatml, zephyr, alpaca"):
        get_chat_template(tok, "chatml3")
    with pytest.raises(ValueError, match="mapping needs exactly the keys role, content, user, assistant"):
        get_chat_template(tok, "chatml", mapping={"role": "from"})
    with pytest.raises(TypeError, match="unsloth_core Tokenizer"):
        get_chat_template(as_transformers(tok), "chatml")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="tool definitions"):
        quiet(tok, "llama-3.1").apply_chat_template(CONVERSATION, tools=[{"name": "f"}], tokenize=False)


def test_a_custom_template_and_its_stop_token() -> None:
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    tok = get_chat_template(make_tiny_tokenizer(), (template, "<|im_end|>"))
    assert tok.render_chat(CONVERSATION[1:2]) == "user:  Hi <|im_end|>" and tok.eos_token == "<|im_end|>"


def test_saved_and_reloaded_by_us_and_transformers(tmp_path: Path) -> None:
    base = make_tiny_tokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>")
    chat = quiet(base, "chatml")
    chat.padding_side = "left"
    chat.save_pretrained(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.eos_token, again.pad_token, again.padding_side) == ("<|im_end|>", "<|im_end|>", "left")
    assert again.render_chat(CONVERSATION) == chat.render_chat(CONVERSATION)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == base.eos_token_id
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == chat.render_chat(CONVERSATION)


def test_setting_chat_template_recompiles_it() -> None:
    tok = make_tiny_tokenizer()
    assert tok.render_chat(CONVERSATION[1:2]).startswith("<|im_start|>user")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tok.render_chat(CONVERSATION[1:2]) == " Hi "


def test_standardize_sharegpt_lists_and_datasets() -> None:
    rows = [{"conversations": SHAREGPT, "source": "x"}, {"conversations": SHAREGPT[1:3], "source": "y"}]
    out = standardize_sharegpt(rows)
    assert out == [{"conversations": CONVERSATION, "source": "x"}, {"conversations": CONVERSATION[1:3], "source": "y"}]
    ds = standardize_sharegpt(datasets.Dataset.from_list(rows))
    assert ds.to_list() == out
    assert standardize_sharegpt(out) == out  # already standard: unchanged
    custom = standardize_sharegpt([{"dialog": [{"from": "bot", "value": "hi"}]}],
                                  aliases={"assistant": ["bot"]})
    assert custom == [{"dialog": [{"role": "assistant", "content": "hi"}]}]  # the one column of messages


def test_standardize_sharegpt_refusals() -> None:
    with pytest.raises(ValueError, match="row 1, message 0: unknown role 'robot'"):
        standardize_sharegpt([{"conversations": SHAREGPT}, {"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ValueError, match="needs 'from' and 'value'"):
        standardize_sharegpt([{"conversations": [{"speaker": "human", "text": "x"}]}])
    with pytest.raises(ValueError, match="cannot tell which column"):
        standardize_sharegpt([{"a": "x"}])
    with pytest.raises(TypeError, match="list of rows"):
        standardize_sharegpt("conversations")
