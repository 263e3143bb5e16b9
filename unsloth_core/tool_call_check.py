"""Does a model still call tools? Its greedy replies to tool-use conversations, read back as serving reads them.

A turn is a conversation up to an assistant turn that called tools (from a training or validation file), with the
row's tools offered as serving offers them (`tool_calls.conversation_inputs`). The model answers freely, with no
grammar: the point is whether the weights still produce calls, not whether a mask can force them. A reply is
`valid` when it holds at least one call and every call names an offered function with arguments that validate
against that function's JSON Schema; `matched` when, besides, it calls the functions the data's turn called.

Fine-tunes lose tool calling quietly (the trackers' "my fine-tune stopped calling tools"): run at every checkpoint,
with the base's figure beside it, the loss is seen while the job runs, not after deployment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
from referencing.exceptions import Unresolvable

from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import Tool, ToolCall, calls_of, conversation_inputs, parse_tool_calls, tool_support
from unsloth_core.tool_calls.prompt import ToolCallError

if TYPE_CHECKING:  # the API imports this module for judge_calls: torch stays out of it until generation
    from unsloth_core.model import Llama

DEFAULT_TURNS = 16
DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class ToolTurn:
    """A conversation up to an assistant turn that called tools; `expected`: the names it called, in order."""

    messages: list[dict[str, Any]]
    tools: list[Tool]
    expected: list[str]


@dataclass(frozen=True)
class TurnResult:
    output: str
    calls: list[ToolCall]
    problems: list[str]  # why the reply is not valid; empty when it is
    matched: bool

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class ToolCallReport:
    turns: list[TurnResult] = field(default_factory=list)
    n_skipped: int = 0  # turns whose prompt does not fit the context with room for the reply

    @property
    def valid_rate(self) -> float:
        return sum(t.valid for t in self.turns) / len(self.turns) if self.turns else float("nan")

    @property
    def match_rate(self) -> float:
        return sum(t.matched for t in self.turns) / len(self.turns) if self.turns else float("nan")

    def to_dict(self) -> dict[str, Any]:
        turns = [{"output": t.output, "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in t.calls],
                  "valid": t.valid, "matched": t.matched, "problems": t.problems} for t in self.turns]
        return {"n_turns": len(self.turns), "n_skipped": self.n_skipped, "valid_rate": self.valid_rate,
                "match_rate": self.match_rate, "turns": turns}


def tool_turns(rows: Iterable[dict[str, Any]], n: int = DEFAULT_TURNS) -> list[ToolTurn]:
    """The first `n` tool-calling assistant turns of chat rows that offer tools (rows of other kinds are skipped)."""
    out: list[ToolTurn] = []
    for row in rows:
        messages, tools = row.get("messages"), row.get("tools")
        if not (isinstance(messages, list) and isinstance(tools, list) and tools):
            continue
        for i, message in enumerate(messages):
            if len(out) == n:
                return out
            if isinstance(message, dict) and message.get("role") == "assistant" and message.get("tool_calls"):
                out.append(ToolTurn(messages[:i], tools, [c.name for c in calls_of(message)]))
    return out


def file_tool_turns(paths: Sequence[str | Path | None], n: int = DEFAULT_TURNS) -> list[ToolTurn]:
    """Turns from the files in order (validation first, then training, say) until there are `n`."""
    out: list[ToolTurn] = []
    for path in paths:
        if path is None or len(out) == n:
            continue
        out += tool_turns(read_rows(Path(path)), n - len(out))
    return out


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """A JSONL file's object rows, lazily; lines that are not JSON objects are passed over."""
    with path.open("rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:
                continue  # a line that is no row holds no turn (uploads report bad lines themselves)
            if isinstance(row, dict):
                yield row


def check_reply(text: str, turn: ToolTurn, tokenizer: Tokenizer) -> TurnResult:
    """One reply's text judged against its turn's tools (see the module's docstring)."""
    convention, _ = tool_support(tokenizer)
    if convention is None:
        return TurnResult(text, [], ["the chat template follows no tool-call convention"], False)
    _, calls = parse_tool_calls(text, convention)
    return judge_calls(text, calls, turn)


def judge_calls(output: str, calls: Sequence[ToolCall], turn: ToolTurn) -> TurnResult:
    """A reply's calls (as parsed from `output`) judged against its turn's tools."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in turn.tools}
    problems = [] if calls else ["no tool call"]
    for i, call in enumerate(calls):
        problems += [f"tool_calls[{i}]: {p}" for p in _call_problems(call, schemas)]
    matched = not problems and [c.name for c in calls] == turn.expected
    return TurnResult(output, list(calls), problems, matched)


def _call_problems(call: ToolCall, schemas: dict[str, dict[str, Any]]) -> list[str]:
    if call.name not in schemas:
        return [f"{call.name!r} is not an offered function"]
    try:
        arguments = json.loads(call.arguments)
    except ValueError as e:
        return [f"the arguments are not JSON: {e}"]
    try:
        jsonschema.Draft202012Validator.check_schema(schemas[call.name])
        errors = list(jsonschema.Draft202012Validator(schemas[call.name]).iter_errors(arguments))
    except (jsonschema.exceptions.SchemaError, jsonschema.exceptions.UnknownType, Unresolvable) as e:
        # the data's schema, not the reply, is at fault
        return [f"{call.name!r}'s parameters are not a JSON Schema this check can apply: {e}"[:300]]
    return [f"arguments{''.join(f'[{p!r}]' for p in e.absolute_path)}: {e.message}" for e in errors][:3]


@dataclass
class ToolCallCheck:
    """The check as a checkpoint evaluation: `run` answers every turn greedily with the model as it is now."""

    turns: list[ToolTurn]
    tokenizer: Tokenizer
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_tokens: int | None = None
    start: dict[str, float] = field(default_factory=dict)

    def report(self, model: Llama) -> ToolCallReport:
        import torch

        from unsloth_core.generate import Generator
        from unsloth_core.rl.grpo import rollout_mode
        from unsloth_core.sampling import SamplingParams

        generator = Generator(model, self.tokenizer)
        limit = generator.max_seq_length - self.max_new_tokens
        if self.max_prompt_tokens is not None:
            limit = min(limit, self.max_prompt_tokens)
        # A prompt cut to fit would lose its tools block (it comes first), so a turn that does not fit is skipped.
        fitting = [(t, ids) for t in self.turns if len(ids := self._prompt(t)) <= limit]
        if not fitting:
            return ToolCallReport([], len(self.turns))
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        with torch.no_grad(), rollout_mode(model):
            outputs = generator.generate([ids for _, ids in fitting], params)
        results = [check_reply(o.text, t, self.tokenizer) for o, (t, _) in zip(outputs, fitting)]
        return ToolCallReport(results, len(self.turns) - len(fitting))

    def run(self, model: Llama) -> dict[str, float]:
        """The rates as checkpoint metrics, beside the start's (`measure_start`); none when no turn fits."""
        report = self.report(model)
        if not report.turns:
            return {}
        return {**self.start, "eval_tool_calls/valid": report.valid_rate,
                "eval_tool_calls/matched": report.match_rate}

    def measure_start(self, model: Llama) -> None:
        """Check the model training starts from (the base, or the fine-tune continued): every later `run` reports
        its figures as `start_valid` and `start_matched`."""
        self.start = {}
        self.start = {k.replace("/", "/start_", 1): v for k, v in self.run(model).items()}

    def _prompt(self, turn: ToolTurn) -> list[int]:
        messages, tools = conversation_inputs(self.tokenizer, turn.messages, turn.tools)
        return list(self.tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True))


def tool_call_check(turns: Sequence[ToolTurn], tokenizer: Tokenizer, max_new_tokens: int = DEFAULT_MAX_TOKENS,
                    max_prompt_tokens: int | None = None) -> ToolCallCheck | None:
    """The check over `turns`; None when there are none or the template cannot be given tools (its family follows
    no convention we read, so there is nothing to check)."""
    if not turns:
        return None
    try:
        for turn in turns:
            conversation_inputs(tokenizer, turn.messages, turn.tools)
    except ToolCallError:
        return None
    return ToolCallCheck(list(turns), tokenizer, max_new_tokens, max_prompt_tokens)
