"""validate_file reads the whole file and names every bad line; load_examples refuses a file with any."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.core.data.conftest import FIXTURES
from unsloth_core.data import DataFileError, ValidationReport, load_examples, validate_file
from unsloth_core.data.examples import ChatExample, PreferenceExample
from unsloth_core.errors import DataFormatError
from unsloth_core.tokenizer import Tokenizer

# broken.jsonl, line by line (lines 2 and 14 are blank and skipped; 1, 24 and 25 are valid).
BROKEN = {
    3: "invalid_json",
    4: "invalid_utf8",
    5: "not_an_object",
    6: "unknown_format",
    7: "mixed_formats",
    8: "missing_messages",
    9: "empty_messages",
    10: "invalid_message",
    11: "unrecognized_role",
    12: "missing_content",
    13: "invalid_content_type",
    15: "no_assistant_message",
    16: "invalid_weight",
    17: "missing_field",
    18: "invalid_json",
    19: "no_assistant_message",
    20: "invalid_json",
    21: "invalid_content_type",
    22: "invalid_field_type",
    23: "not_an_object",
}


def write(tmp_path: Path, rows: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(question: str = "Hi", answer: str = "Hello") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def codes(report: ValidationReport) -> dict[int | None, str]:
    return {e.line: e.code for e in report.errors}


def test_every_broken_line_is_reported_with_its_number_and_code() -> None:
    report = validate_file(FIXTURES / "broken.jsonl", purpose="sft")
    assert codes(report) == BROKEN
    assert len(set(BROKEN.values())) >= 12
    assert report.format == "chat" and report.purpose == "sft"
    assert report.n_errors == len(BROKEN) and not report.ok
    assert report.n_lines == 23 and report.n_examples == 3  # BOM + CRLF line 1, line 24, line 25 (no final newline)
    assert report.error_counts["invalid_json"] == 3
    messages = {e.line: e.message for e in report.errors}
    assert "byte 47 of the line (0xe9)" in messages[4] and "UTF-8" in messages[4]
    assert "the file is chat (from line 1)" in messages[7]
    assert "`messages[1].weight` is 2" in messages[16]
    assert "column" in messages[3]


def test_report_is_json_and_summarises() -> None:
    report = validate_file(FIXTURES / "broken.jsonl")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["n_errors"] == len(BROKEN) and data["errors_truncated"] is False
    assert data["errors"][0] == {"line": 3, "code": "invalid_json", "message": report.errors[0].message}
    assert report.summary().startswith(f"{len(BROKEN)} invalid line(s) in the training file: line 3: invalid_json")


def test_errors_are_capped_but_all_counted(tmp_path: Path) -> None:
    path = write(tmp_path, ["{"] * 50)
    report = validate_file(path, max_errors=5)
    assert report.n_errors == 50 and len(report.errors) == 5 and report.to_dict()["errors_truncated"]
    assert [e.line for e in report.errors] == [1, 2, 3, 4, 5]


def test_load_examples_refuses_a_file_with_errors() -> None:
    with pytest.raises(DataFileError) as info:
        load_examples(FIXTURES / "broken.jsonl")
    assert isinstance(info.value, DataFormatError)
    assert info.value.report.n_errors == len(BROKEN) and info.value.errors[0].line == 3
    assert "line 3: invalid_json" in str(info.value)


def test_bom_crlf_blank_lines_and_file_objects(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat()).encode() + b"\r\n\r\n  \r\n"
                     + json.dumps(chat("a", "b")).encode() + b"\r\n")
    examples = load_examples(path, purpose="sft")
    assert len(examples) == 2 and all(isinstance(e, ChatExample) for e in examples)
    with path.open("rb") as f:  # a binary file object works too, and is left open
        assert validate_file(f).n_examples == 2
        assert not f.closed
    assert validate_file(io.BytesIO(path.read_bytes())).ok


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "empty.jsonl").write_bytes(content)
    report = validate_file(tmp_path / "empty.jsonl")
    assert [(e.line, e.code) for e in report.errors] == [(None, "empty_file")]


def test_utf16_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "u16.jsonl").write_bytes((json.dumps(chat()) + "\n").encode("utf-16"))
    report = validate_file(tmp_path / "u16.jsonl")
    assert [(e.line, e.code) for e in report.errors] == [(None, "invalid_utf8")]
    assert "UTF-16" in report.errors[0].message


def test_huge_line_is_skipped_without_reading_it_whole(tmp_path: Path) -> None:
    path = write(tmp_path, [chat(), chat("x" * 5000), chat()])
    report = validate_file(path, max_line_bytes=1000)
    assert codes(report) == {2: "line_too_large"} and report.n_examples == 2 and report.n_lines == 3


def test_wrong_purpose_is_reported_once(tmp_path: Path) -> None:
    sft = write(tmp_path, [chat(), chat()])
    report = validate_file(sft, purpose="dpo")
    assert codes(report) == {1: "wrong_purpose"} and "DPO job needs preference pairs" in report.errors[0].message
    dpo = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}], "dpo.jsonl")
    assert codes(validate_file(dpo, purpose="sft")) == {1: "wrong_purpose"}
    assert validate_file(dpo, purpose="dpo").ok and validate_file(sft, purpose=None).ok
    with pytest.raises(ValueError, match="purpose"):
        validate_file(sft, purpose="kto")  # type: ignore[arg-type]


def test_the_first_example_sets_the_format(tmp_path: Path) -> None:
    path = write(tmp_path, [{"text": "a"}, chat(), {"text": "b"}, {"prompt": "p", "completion": "c"}])
    report = validate_file(path)
    assert report.format == "text" and codes(report) == {2: "mixed_formats", 4: "mixed_formats"}


def test_every_format_loads(tmp_path: Path) -> None:
    rows = {
        "chat": chat(),
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "i", "input": "", "output": "o"},
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "text": {"text": "t"},
        "preference": {"input": {"messages": [{"role": "user", "content": "q"}]},
                       "preferred_output": [{"role": "assistant", "content": "a"}],
                       "non_preferred_output": [{"role": "assistant", "content": "b"}]},
        "chosen_rejected": {"prompt": "q", "chosen": "a", "rejected": "b"},
    }
    for name, row in rows.items():
        report = validate_file(write(tmp_path, [row, row], f"{name}.jsonl"))
        assert report.ok and report.format == name and report.n_examples == 2, name
        assert report.purpose == ("dpo" if name in ("preference", "chosen_rejected") else "sft")


def test_token_counts_truncation_and_too_long(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    # tiny tokenizer: one token per byte; `<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n` is 20 tokens
    path = write(tmp_path, [chat("Q", "A"), chat("Q", "A" * 100), chat("Q" * 100, "A")])
    report = validate_file(path, tiny_tokenizer, max_seq_length=64)
    assert codes(report) == {3: "too_long"}
    assert "max_seq_length=64" in report.errors[0].message
    assert report.n_truncated == 1 and report.n_examples == 2
    assert report.n_tokens == 23 + 64  # 20 + "A" + <|im_end|> + "\n"; the second cut to 64
    assert report.n_loss_tokens == 2 + (64 - 20)
    unlimited = validate_file(path, tiny_tokenizer)
    assert unlimited.ok and unlimited.n_truncated == 0
    assert validate_file(path).n_tokens is None  # no tokenizer, no counts


def test_preference_token_counts(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = write(tmp_path, [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    report = validate_file(path, tiny_tokenizer, purpose="dpo")
    # prompt 20 tokens, twice; replies "yes<|im_end|>" and "no<|im_end|>"
    assert report.ok and report.n_tokens == 40 + 4 + 3 and report.n_loss_tokens == 7
    assert isinstance(load_examples(path, purpose="dpo")[0], PreferenceExample)


def test_template_errors_are_line_errors(tmp_path: Path) -> None:
    from tests.helpers import CHATML, make_tiny_tokenizer

    strict = make_tiny_tokenizer("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user')"
                                 " }}{% endif %}" + CHATML)
    bad = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "b"}]}
    report = validate_file(write(tmp_path, [chat(), bad]), strict)
    assert codes(report) == {2: "template_error"} and "start with a user" in report.errors[0].message


def test_validating_does_not_import_torch() -> None:
    # The API process validates uploads; it must not pay for torch (only `collate` needs it, imported inside).
    import subprocess
    import sys

    code = "import sys, unsloth_core.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_chat_line_without_a_reply_is_that_lines_error_not_a_prompt(tmp_path: Path) -> None:
    user_only = {"messages": [{"role": "user", "content": "Hi"}]}
    report = validate_file(write(tmp_path, [chat(), user_only]))
    assert report.format == "chat" and codes(report) == {2: "no_assistant_message"}


def test_reinforcement_files(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    prompt = {"messages": [{"role": "user", "content": "Q"}], "answer": "A"}
    path = write(tmp_path, [prompt, {**prompt, "answer": "B"}])
    report = validate_file(path, tiny_tokenizer, max_seq_length=16)
    assert (report.ok, report.format, report.purpose, report.n_examples) == (True, "rl_messages", "rl", 2)
    assert report.n_tokens == 2 * len(tiny_tokenizer.apply_chat_template(prompt["messages"],
                                                                        add_generation_prompt=True))
    assert report.n_truncated == 2 and report.n_loss_tokens == 0  # longer than 16; GRPO keeps the prompt's end
    # An SFT job refuses it, naming what it needs; an RL job refuses SFT data the same way.
    refused = validate_file(path, purpose="sft")
    assert codes(refused) == {1: "wrong_purpose"} and "RL" in refused.errors[0].message
    sft = validate_file(write(tmp_path, [{"text": "hello"}], "sft.jsonl"), purpose="rl")
    assert codes(sft) == {1: "wrong_purpose"} and "prompts" in sft.errors[0].message
    # read as RL, a conversation that ends with a reply is an RL line's error
    ended = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert codes(validate_file(write(tmp_path, [prompt, ended], "b.jsonl"), purpose="rl")) == {2: "invalid_prompt"}
