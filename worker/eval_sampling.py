"""The evaluated model's answers for an eval run, generated in this worker process with the engine.

`EvalSampler` is the worker's `LocalJudge` (its loader: a base model, a fine-tune's or a checkpoint's adapter on it,
the adapter's own tokenizer and chat template winning; the last models kept loaded, an adapter sharing its base's
weights), asked one more thing: a batch of conversations answered in one batched generation, each answer with its
finish reason and token counts, as a run's output items report them. The same object judges the run's
score_model / label_model criteria, so a judge that is the evaluated model (or shares its base) loads once.

Imported only by the worker, when a run starts: it loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from unsloth_core.generate import Completion
from unsloth_core.graders import LocalJudge
from unsloth_core.sampling import SamplingParams


@dataclass(frozen=True)
class SampleRequest:
    """One item's conversation and OpenAI's sampling values for it (`max_tokens`: max_completion_tokens)."""

    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


class EvalSampler(LocalJudge):
    """A LocalJudge that also answers eval items (see the module's docstring). Keep `max_loaded` at 2 or more so the
    evaluated model and a different judge both stay loaded across batches."""

    def sample(self, model: str, requests: Sequence[SampleRequest]) -> list[Completion | str]:
        """One answer per request, in order, generated in one batch; a request that cannot be answered (its
        messages do not render with the chat template, or its prompt fills the context) gets the reason instead.
        Raises UnknownJudgeModelError for a model `resolve` does not know."""
        where = self._where(model)
        answers: list[Completion | str] = [""] * len(requests)
        with self._lock:
            loaded = self._load(model, where)
            context = loaded.generator.max_seq_length
            prompts, params, rows = [], [], []
            for i, request in enumerate(requests):
                # chat templates of open models know no `developer`: it is the system turn (as judges send it)
                turns = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in request.messages]
                try:
                    ids = loaded.tokenizer.apply_chat_template(turns, add_generation_prompt=True)
                except (jinja2.TemplateError, ValueError, TypeError) as e:
                    answers[i] = f"the messages cannot be rendered with {model}'s chat template: {e}"
                    continue
                if len(ids) >= context:
                    answers[i] = f"the prompt is {len(ids)} tokens and {model}'s context holds {context}"
                    continue
                prompts.append(ids)
                params.append(SamplingParams(max_new_tokens=min(request.max_tokens, context - len(ids)),
                                             temperature=request.temperature, top_p=request.top_p,
                                             seed=request.seed))
                rows.append(i)
            if prompts:
                for i, completion in zip(rows, loaded.generator.generate(prompts, params)):
                    answers[i] = completion
        return answers
