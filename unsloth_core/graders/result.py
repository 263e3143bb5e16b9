"""What grading one sample returns, and its rendering as OpenAI's graders/run response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# OpenAI's error flags (graders/run `metadata.errors`); each `GradeError` carries one of them.
ErrorCode = Literal[
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
]
_FLAGS: tuple[str, ...] = get_args(ErrorCode)
# Flags that come with a text field beside them in OpenAI's response.
_DETAILS = {
    "model_grader_server_error": "model_grader_server_error_details",
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
}


@dataclass(frozen=True)
class GradeError:
    """Why a sample (or one sub-grader of a multi grader) scored 0. `grader` is the sub-grader's key, or ''."""

    code: ErrorCode
    message: str
    grader: str = ""


@dataclass
class GradeResult:
    """One sample's grade.

    Args:
        score: the reward (OpenAI's `reward`): the grader's score, 0 when an error stopped it. Not always in [0, 1]:
            a score_model's range or a multi grader's formula may leave it.
        passed: whether it reaches the grader's bar (`pass_threshold`, `passing_labels`, a string check's 1);
            None when the grader sets none.
        sub_scores: a multi grader's sub-graders' scores by key (OpenAI's `sub_rewards`).
        errors: what went wrong; empty on a clean grade.
        details: what else the grader saw (a model grader's raw output and parsed value, a python grader's
            stderr), for a user looking at a rollout.
    """

    name: str
    type: str
    score: float
    passed: bool | None = None
    sub_scores: dict[str, float] = field(default_factory=dict)
    errors: list[GradeError] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def error_flags(self) -> dict[str, bool | str | None]:
        """OpenAI's `metadata.errors` object: every flag, set for the codes present, with the details fields."""
        flags: dict[str, bool | str | None] = dict.fromkeys(_FLAGS, False)
        flags.update(dict.fromkeys(_DETAILS.values()))
        for error in self.errors:
            flags[error.code] = True
            if error.code in _DETAILS:
                where = f"{error.grader}: " if error.grader else ""
                previous, text = flags[_DETAILS[error.code]], where + error.message
                flags[_DETAILS[error.code]] = f"{previous}\n{text}" if previous else text
        return flags

    def to_run_response(self, *, execution_time: float, sampled_model_name: str | None = None) -> dict[str, Any]:
        """The body of OpenAI's `POST /fine_tuning/alpha/graders/run` answer for this grade."""
        return {
            "reward": self.score,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": self.error_flags(),
                "execution_time": execution_time,
                "scores": dict(self.sub_scores),
                "token_usage": None,
                "sampled_model_name": sampled_model_name,
            },
            "sub_rewards": dict(self.sub_scores),
            "model_grader_token_usage_per_model": {},
        }
