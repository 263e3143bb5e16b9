"""An OpenAI grader as a GRPO reward function: what a reinforcement job trains on.

The grader sees each completion as `sample.output_text` and its dataset row as `item` (every field of the row, the
prompt's `messages` or `prompt` included, as OpenAI's reinforcement fine-tuning passes it). A sample the grader
cannot score (a missing field, a judge's unreadable answer, the user's python failing) scores 0, as OpenAI scores
it, and its errors are counted so a run whose grader fails everywhere says so instead of learning from zeros.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from unsloth_core.graders import Embed, Grader, GradeResult, Judge, SandboxConfig, grade_batch, validate_grader


class GraderReward:
    """A callable with TRL's reward signature, `(prompts, completions, **columns) -> list[float]`.

    Args:
        grader: OpenAI's grader JSON or a validated grader.
        judge, embed, allow_python, sandbox: as `grade_batch` takes them.
    """

    def __init__(self, grader: Grader | Mapping[str, Any], *, judge: Judge | None = None, embed: Embed | None = None,
                 allow_python: bool = False, sandbox: SandboxConfig | None = None) -> None:
        self.grader = validate_grader(grader)
        self.judge, self.embed, self.allow_python, self.sandbox = judge, embed, allow_python, sandbox
        self.__name__ = self.grader.name or self.grader.type  # the name reward metrics are logged under
        self.last: list[GradeResult] = []  # the latest batch's grades (sub-scores and errors, for rollouts)
        self.error_counts: Counter[str] = Counter()  # every error code seen so far

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> list[float]:
        columns = {k: v for k, v in columns.items() if k not in ("completion_ids", "trainer_state")}
        items = [self._item(prompt, {k: v[i] for k, v in columns.items()}) for i, prompt in enumerate(prompts)]
        texts = [_text(c) for c in completions]
        results = grade_batch(self.grader, texts, items, judge=self.judge, embed=self.embed,
                              allow_python=self.allow_python, sandbox=self.sandbox)
        self.last = results
        self.error_counts.update(e.code for r in results for e in r.errors)
        return [r.score for r in results]

    def explain(self, row: int) -> dict[str, Any]:
        """What the latest batch's grade of `row` held beyond its score (GRPO's rollouts show it)."""
        result = self.last[row]
        out: dict[str, Any] = {"passed": result.passed}
        if result.sub_scores:
            out["sub_scores"] = dict(result.sub_scores)
        if result.errors:
            out["errors"] = [{"code": e.code, "message": e.message, **({"grader": e.grader} if e.grader else {})}
                             for e in result.errors]
        return out

    @staticmethod
    def _item(prompt: Any, fields: dict[str, Any]) -> dict[str, Any]:
        key = "prompt" if isinstance(prompt, str) else "messages"
        return {key: prompt, **fields}


def _text(completion: Any) -> str:
    """A completion's text: a string, or a conversational completion's last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content") or "")
    raise TypeError(f"a completion must be text or a list of messages, got {type(completion).__name__}")
