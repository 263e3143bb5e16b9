"""The `sample` namespace: what the model produced, in the shape OpenAI's graders see it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One model output.

    Args:
        output_text: the message content as a string.
        output_json: the content parsed as JSON; None when it is not JSON (then `{{sample.output_json.x}}` is a
            `sample_parse_error`).
        output_tools: the message's tool calls, in chat completions' shape (`[{"id", "type", "function": {"name",
            "arguments"}}]`).
        choices: the chat completion's choices, in chat completions' shape.
    """

    output_text: str
    output_json: Any = None
    output_tools: list[Any] = field(default_factory=list)
    choices: list[Any] = field(default_factory=list)

    @classmethod
    def from_text(cls, text: str, *, finish_reason: str = "stop") -> Sample:
        """A plain completion: `output_json` set when the whole text is JSON (as graders/run does with its
        `model_sample`), one choice holding the assistant message."""
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            parsed = None
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return cls(output_text=text, output_json=parsed, choices=[choice])

    def namespace(self) -> dict[str, Any]:
        """The dict a template's `sample.` and a python grader's `sample` argument read."""
        return {
            "output_text": self.output_text,
            "output_json": self.output_json,
            "output_tools": self.output_tools,
            "choices": self.choices,
            "output_audio": None,
        }


def as_sample(sample: Sample | str) -> Sample:
    return sample if isinstance(sample, Sample) else Sample.from_text(sample)
