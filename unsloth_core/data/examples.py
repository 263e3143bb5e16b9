"""The few shapes every training file is normalised into, whatever format it came in.

Seven input formats (see `formats.py`) reduce to four dataclasses: raw text, a prompt with its completion, a chat
conversation (alpaca and sharegpt rows become chats too), and a preference pair. Tokenisation and the trainers only
ever see these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One chat turn.

    Args:
        role: system, user, assistant or tool.
        content: the text (content parts are joined when parsed).
        trainable: whether the turn's tokens get loss; only assistant turns can be trainable, and they are unless the
            file gave them `"weight": 0`.
        extra: other keys the chat template may read (`tool_calls`, `tool_call_id`, `name`), passed through untouched.
    """

    role: Role
    content: str
    trainable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template expects (`trainable` is ours, not the template's)."""
        return {**self.extra, "role": self.role, "content": self.content}


@dataclass(frozen=True)
class TextExample:
    """Plain text (continued pre-training): every token gets loss."""

    text: str


@dataclass(frozen=True)
class CompletionExample:
    """A raw prompt and its completion, no chat template: loss on the completion (and the EOS we append) only."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    """A conversation rendered with the model's own chat template; loss on the trainable assistant turns."""

    messages: tuple[Message, ...]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class PreferenceExample:
    """A DPO pair: the prompt conversation (not ending with an assistant turn) and two assistant replies to it."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class RLExample:
    """A prompt for reinforcement learning (OpenAI's RFT rows, TRL's prompt-only rows): the conversation (or raw text)
    the policy answers, and every other field of the row, which the graders and reward functions read."""

    prompt: str | tuple[Message, ...]
    columns: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None


SFTExample = TextExample | CompletionExample | ChatExample
Example = SFTExample | PreferenceExample | RLExample
