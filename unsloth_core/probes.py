"""Probe prompts: a few prompts answered (greedily) at every checkpoint, so the change from one checkpoint to the
next can be read rather than guessed from a loss.

The prompts are the user's, or the first held-out examples' prompts: a conversation up to its last assistant turn, a
completion's or a preference pair's prompt, a reinforcement prompt (plain text examples have none). A conversation
whose row offers tools is asked with them, rendered as training and serving render it. Answers are greedy, so two
checkpoints' answers differ only because their weights do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unsloth_core.data.examples import ChatExample, CompletionExample, PreferenceExample, RLExample
from unsloth_core.generate import Generator
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import ToolCallError, conversation_inputs

# Text, a conversation, or {"messages": [...], "tools": [...]}: a conversation offering tools (a chat row's shape)
Prompt = str | list[dict[str, Any]] | dict[str, Any]
DEFAULT_PROBES = 3
DEFAULT_MAX_TOKENS = 64


@dataclass
class Probes:
    prompts: list[Prompt]
    ids: list[list[int]]
    tokenizer: Tokenizer
    max_new_tokens: int = DEFAULT_MAX_TOKENS

    def run(self, model: Llama) -> list[dict[str, Any]]:
        """Each prompt with the model's greedy answer as it is now; the model's modes and caches as they were."""
        from unsloth_core.rl.grpo import rollout_mode

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        with torch.no_grad(), rollout_mode(model):
            outputs = Generator(model, self.tokenizer).generate(self.ids, params)
        return [{**_shown(p), "output": o.text, "finish_reason": o.finish_reason}
                for p, o in zip(self.prompts, outputs)]


def _shown(prompt: Prompt) -> dict[str, Any]:
    """A sample's prompt as a checkpoint shows it: text or messages, and the names of the tools offered."""
    if isinstance(prompt, dict):
        return {"prompt": prompt["messages"], "tools": [t["function"]["name"] for t in prompt.get("tools") or []]}
    return {"prompt": prompt}


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> list[int]:
    """A prompt's token ids: text as is, a conversation through the chat template with its generation prompt (and
    its tools as serving offers them; a template that cannot be given tools renders the messages alone)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    messages, tools = (prompt["messages"], prompt.get("tools")) if isinstance(prompt, dict) else (prompt, None)
    try:
        messages, tools = conversation_inputs(tokenizer, messages, tools)
    except ToolCallError:
        tools = None
    return list(tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True))


def make_probes(prompts: Sequence[Prompt], tokenizer: Tokenizer, max_new_tokens: int = DEFAULT_MAX_TOKENS,
                max_prompt_tokens: int | None = None) -> Probes | None:
    """Probes for these prompts (conversations through the chat template with its generation prompt); None when
    there are none. A prompt longer than `max_prompt_tokens` keeps its end."""
    if not prompts:
        return None
    ids = []
    for prompt in prompts:
        tokens = prompt_ids(prompt, tokenizer)
        ids.append(tokens[-max_prompt_tokens:] if max_prompt_tokens else tokens)
    return Probes(list(prompts), ids, tokenizer, max_new_tokens)


def example_prompts(examples: Sequence[Any], n: int = DEFAULT_PROBES) -> list[Prompt]:
    """The prompts of the first `n` examples that have one."""
    out: list[Prompt] = []
    for example in examples:
        if len(out) >= n:
            break
        prompt = example_prompt(example)
        if prompt is not None:
            out.append(prompt)
    return out


def example_prompt(example: Any) -> Prompt | None:
    """An example's prompt: a conversation up to its last reply, a completion's or a pair's prompt; None for text."""
    if isinstance(example, ChatExample):
        last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
        head = example.messages[:last] if last is not None else example.messages
        return _with_tools([m.to_template() for m in head], example.tools) if head else None
    if isinstance(example, CompletionExample):
        return example.prompt or None
    if isinstance(example, PreferenceExample):
        return _with_tools([m.to_template() for m in example.prompt], example.tools)
    if isinstance(example, RLExample):
        if isinstance(example.prompt, str):
            return example.prompt
        return _with_tools([m.to_template() for m in example.prompt], example.tools)
    prompt = getattr(example, "prompt", None)  # GRPO's PromptExample
    return prompt if isinstance(prompt, str | list) else None


def _with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Prompt:
    return {"messages": messages, "tools": tools} if tools else messages
