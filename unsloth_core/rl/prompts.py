"""Prompts for reinforcement learning: what GRPO samples completions for, and the fields its rewards read.

A row is a JSON object with the prompt in one of three shapes, and any other fields (a reference answer, a test
case) passed to the reward functions by name, one value per completion:

    {"prompt": "2 + 2 ="}                                        plain text, tokenized as is
    {"prompt": [{"role": "user", "content": "2 + 2?"}]}          TRL's conversational prompt
    {"messages": [{"role": "user", "content": "2 + 2?"}], ...}   OpenAI's reinforcement fine-tuning rows

Conversations are rendered with the model's chat template and its generation prompt. A prompt longer than the room
left for the completion keeps its end (TRL truncates on the left: the question is at the end).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_core.data.validation import DataFileError, ValidationReport
from unsloth_core.errors import DataFormatError
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import ToolCallError, conversation_inputs

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class PromptExample:
    """One row: the prompt as given, and every other field of the row."""

    prompt: Prompt
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class TokenizedPrompt:
    example: PromptExample
    ids: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def prompt_example(row: Mapping[str, Any]) -> PromptExample:
    """The row as a PromptExample; raises ValueError naming what is wrong with it."""
    if "prompt" in row and "messages" in row:
        raise ValueError("a row gives its prompt as `prompt` or as `messages`, not both")
    key = "prompt" if "prompt" in row else "messages"
    if key not in row:
        raise ValueError("a row needs a `prompt` (text or a list of messages) or `messages`")
    prompt = row[key]
    if isinstance(prompt, str):
        if key == "messages":
            raise ValueError("`messages` must be a list of {role, content} objects")
        if not prompt:
            raise ValueError("`prompt` is empty")
    elif isinstance(prompt, list):
        if not prompt:
            raise ValueError(f"`{key}` is an empty list")
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"`{key}[{i}]` must be an object with a `role` and a `content`")
        # OpenAI's `developer` role is a system prompt to open models' chat templates.
        prompt = [{**m, "role": "system"} if m["role"] == "developer" else dict(m) for m in prompt]
    else:
        raise ValueError(f"`{key}` must be text or a list of messages, got {type(prompt).__name__}")
    return PromptExample(prompt, {k: v for k, v in row.items() if k != key})


def prompt_examples(rows: Iterable[Mapping[str, Any]]) -> list[PromptExample]:
    """Rows from code (a list of dicts, a `datasets.Dataset`); raises ValueError naming the first bad row."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(prompt_example(row))
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
    if not out:
        raise ValueError("no prompts")
    return out


def load_prompts(source: str | Path, tokenizer: Tokenizer | None = None, role: str = "training"
                 ) -> list[PromptExample]:
    """Every row of a JSONL file; raises DataFileError listing every bad line (a conversation the chat template
    refuses included, when a tokenizer is given)."""
    report = ValidationReport(format="prompt", purpose=None)
    examples: list[PromptExample] = []
    with Path(source).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.n_lines += 1
            try:
                row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                report.add(number, "invalid_utf8", "the line is not UTF-8")
                continue
            except ValueError as e:
                report.add(number, "invalid_json", f"not a JSON object ({e})")
                continue
            if not isinstance(row, dict):
                report.add(number, "not_an_object", "each line must be a JSON object")
                continue
            try:
                example = prompt_example(row)
                if tokenizer is not None and example.conversational:
                    render(example, tokenizer)
            except ValueError as e:
                report.add(number, "invalid_prompt", str(e))
                continue
            except DataFormatError as e:
                report.add(number, "template_error", str(e))
                continue
            examples.append(example)
            report.n_examples += 1
    if report.n_lines == 0 and report.ok:
        report.add(None, "empty_file", "the file has no prompts (it is empty or holds only blank lines)")
    if not report.ok:
        raise DataFileError(report, role)
    return examples


def render(example: PromptExample, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: text encoded as is, a conversation through the chat template with its generation
    prompt (as TRL renders it; a row's `tools` offered as serving offers them)."""
    if isinstance(example.prompt, str):
        return tokenizer.encode(example.prompt)
    tools = example.columns.get("tools")
    try:
        messages, tools = conversation_inputs(tokenizer, example.prompt, tools if isinstance(tools, list) else None)
    except ToolCallError as e:
        raise DataFormatError(f"{e.where}: {e}") from None
    try:
        ids = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception, or a message it cannot render
        raise DataFormatError(f"the chat template cannot render this prompt: {e}") from None
    return list(ids)


def tokenize_prompt(example: PromptExample, tokenizer: Tokenizer, max_length: int) -> TokenizedPrompt:
    """The prompt's ids, cut to its last `max_length` tokens when longer."""
    ids = render(example, tokenizer)
    if len(ids) > max_length:
        return TokenizedPrompt(example, ids[-max_length:], True)
    return TokenizedPrompt(example, ids, False)
