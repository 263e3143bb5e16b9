"""DPO tokenisation: the prompt ends with the assistant header, each reply with the end-of-turn token."""

from __future__ import annotations

import pytest

from unsloth_core.data.collate import collate_preference
from unsloth_core.data.examples import Message, PreferenceExample
from unsloth_core.data.preference import tokenize_preference
from unsloth_core.data.sft import IGNORE_INDEX
from unsloth_core.tokenizer import Tokenizer


def pair(question: str = "Q", chosen: str = "yes", rejected: str = "no") -> PreferenceExample:
    return PreferenceExample((Message("user", question),), Message("assistant", chosen, True),
                             Message("assistant", rejected, True))


def test_prompt_and_replies(tiny_tokenizer: Tokenizer) -> None:
    prompt, chosen, rejected = tokenize_preference(pair(), tiny_tokenizer, None)
    assert tiny_tokenizer.decode(prompt) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(chosen) == "yes<|im_end|>"
    assert tiny_tokenizer.decode(rejected) == "no<|im_end|>"


def test_truncation_policy(tiny_tokenizer: Tokenizer) -> None:
    # a long prompt loses its start (keeping the latest turn and the header); the short replies stay whole
    out = tokenize_preference(pair(question="x" * 40, chosen="abcde"), tiny_tokenizer, 30)
    assert out.truncated and len(out.prompt_ids) == 24 and len(out.prompt_ids) + len(out.chosen_ids) <= 30
    assert tiny_tokenizer.decode(out.prompt_ids).endswith("x<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(out.chosen_ids) == "abcde<|im_end|>"
    # long replies are cut at the end to what the whole prompt leaves
    out = tokenize_preference(pair(chosen="y" * 100, rejected="n" * 10), tiny_tokenizer, 50)
    assert out.truncated and len(out.prompt_ids) == 20 and len(out.chosen_ids) == 30 and len(out.rejected_ids) == 11
    # both long: the prompt keeps half the budget
    out = tokenize_preference(pair(question="x" * 100, chosen="y" * 100), tiny_tokenizer, 50)
    assert (len(out.prompt_ids), len(out.chosen_ids)) == (25, 25)
    assert not tokenize_preference(pair(), tiny_tokenizer, 1000).truncated


def test_collate_preference_stacks_chosen_then_rejected(tiny_tokenizer: Tokenizer) -> None:
    pairs = [tokenize_preference(pair(), tiny_tokenizer, None), tokenize_preference(pair("QQ"), tiny_tokenizer, None)]
    batch = collate_preference(pairs, pad_id=0)
    assert batch["input_ids"].shape == (4, 21 + 4)
    for row, (p, reply) in enumerate([(pairs[0], pairs[0].chosen_ids), (pairs[1], pairs[1].chosen_ids),
                                      (pairs[0], pairs[0].rejected_ids), (pairs[1], pairs[1].rejected_ids)]):
        n = len(p.prompt_ids) + len(reply)
        assert batch["input_ids"][row, :n].tolist() == p.prompt_ids + reply
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(p.prompt_ids) + reply + [IGNORE_INDEX] * (25 - n)


@pytest.mark.slow
def test_smollm_pair(smol_tokenizer: Tokenizer) -> None:
    example = pair("What is the capital of Zorbania?", "Quillfort.", "Paris.")
    prompt, chosen, rejected = tokenize_preference(example, smol_tokenizer, None)
    whole = smol_tokenizer.apply_chat_template([{"role": "user", "content": example.prompt[0].content},
                                                {"role": "assistant", "content": "Quillfort."}])
    assert prompt + chosen == whole[:-1]  # everything but the newline after <|im_end|>
    assert smol_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert chosen[-1] == rejected[-1] == smol_tokenizer.eos_token_id


def test_llama3_like_template() -> None:
    from tests.helpers import make_llama3_like_tokenizer

    tokenizer = make_llama3_like_tokenizer()
    prompt, chosen, _ = tokenize_preference(pair(), tokenizer, None)
    assert tokenizer.decode(prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(chosen) == "yes<|eot_id|>"
