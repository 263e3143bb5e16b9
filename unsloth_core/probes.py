"""Probe prompts: a few prompts answered (greedily) at every checkpoint, so the change from one checkpoint to the
next can be read rather than guessed from a loss.

The prompts are the user's, or the first held-out examples' prompts: a conversation up to its last assistant turn, a
completion's or a preference pair's prompt, a reinforcement prompt (plain text examples have none). Answers are
greedy, so two checkpoints' answers differ only because their weights do.
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

Prompt = str | list[dict[str, Any]]
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
        return [{"prompt": p, "output": o.text, "finish_reason": o.finish_reason}
                for p, o in zip(self.prompts, outputs)]


def make_probes(prompts: Sequence[Prompt], tokenizer: Tokenizer, max_new_tokens: int = DEFAULT_MAX_TOKENS,
                max_prompt_tokens: int | None = None) -> Probes | None:
    """Probes for these prompts (conversations through the chat template with its generation prompt); None when
    there are none. A prompt longer than `max_prompt_tokens` keeps its end."""
    if not prompts:
        return None
    ids = []
    for prompt in prompts:
        tokens = (tokenizer.encode(prompt) if isinstance(prompt, str)
                  else list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)))
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
        return [m.to_template() for m in head] or None
    if isinstance(example, CompletionExample):
        return example.prompt or None
    if isinstance(example, PreferenceExample):
        return [m.to_template() for m in example.prompt]
    if isinstance(example, RLExample):
        return example.prompt if isinstance(example.prompt, str) else [m.to_template() for m in example.prompt]
    prompt = getattr(example, "prompt", None)  # GRPO's PromptExample
    return prompt if isinstance(prompt, str | list) else None
