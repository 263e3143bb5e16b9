"""OpenAI's graders on this server: `/v1/fine_tuning/alpha/graders/validate` and `/run`, over `unsloth_core.graders`.

A grader is checked as a whole before anything runs, and every refusal is a 400 whose `param` names the field from
the body's root (`grader.graders.accuracy.operation`):
  - it parses as one of OpenAI's graders (the engine's `validate_grader`);
  - it can run here: python graders only when the operator allows them, no `cosine` (this server serves no
    embedding model), and each score_model / label_model judge is a model this server serves that the key may use.
A sample's own problems (an `item` field it lacks, a judge's unreadable answer, the user's code raising) are not
refusals: they score 0 and raise a flag in `metadata.errors`, as OpenAI's graders/run does.

`sandbox_config(settings)` is the python sandbox's policy for every process that grades (the API, the worker's GRPO
rewards): the settings' limits, and the data dir never visible to the user's code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import ENV_PREFIX, Settings
from app.core.errors import APIError, bad_request
from app.db.models import ApiKey
from app.schemas.common import CONTROL_CHARACTERS
from app.schemas.graders import GraderRunRequest, GraderRunResponse, GraderValidateRequest, GraderValidateResponse
from app.services import models
from app.services.judge import ServedJudge
from app.services.models import Servable
from unsloth_core.graders import (
    Grader,
    GraderUnavailableError,
    GraderValidationError,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    SandboxConfig,
    SandboxLimits,
    ScoreModelGrader,
    TextSimilarityGrader,
    grade,
    validate_grader,
)

PYTHON_DISABLED = (f"python graders are disabled on this server: they run the code they are given. An operator "
                   f"enables them with {ENV_PREFIX}ALLOW_PYTHON_GRADERS=true; they then run in a sandbox without "
                   "network, secrets or the server's data.")
MAX_MODEL_ID = 512  # as a chat completion's `model`


@dataclass(frozen=True)
class CheckedGrader:
    """A grader that parsed and can run here, with its judge models resolved (by the name the grader uses)."""

    grader: Grader
    judges: dict[str, Servable] = field(default_factory=dict)


def sandbox_config(settings: Settings) -> SandboxConfig:
    """How python graders run in this deployment (the API's /run and the worker's rewards alike)."""
    limits = SandboxLimits(seconds_per_sample=settings.python_grader_seconds,
                           memory_bytes=settings.python_grader_memory_bytes)
    return SandboxConfig(limits=limits, isolation=settings.python_grader_isolation,
                         deny_paths=(str(settings.data_dir),))


def parse(obj: Any, param: str = "grader") -> Grader:
    """OpenAI's grader JSON parsed, or a 400 naming the first field at fault (every problem is in the message)."""
    _check_types(obj, param)
    try:
        return validate_grader(obj)
    except GraderValidationError as e:
        problems = [(_join(param, path), message) for path, message in e.problems] or [(param, str(e))]
        text = "; ".join(f"{path}: {message}" for path, message in problems)
        raise bad_request(f"Invalid grader: {text}.", param=problems[0][0]) from None


def _check_types(obj: Any, param: str) -> None:
    """A grader's `type` (and its sub-graders') must be a string: the engine's validate_grader looks it up in a dict
    and raised TypeError (a 500) for a list or an object there."""
    graders = obj.get("graders") if isinstance(obj, Mapping) and obj.get("type") == "multi" else None
    subs = graders.items() if isinstance(graders, Mapping) else []
    for where, grader in [(param, obj), *((_join(param, f"graders.{k}"), v) for k, v in subs)]:
        if isinstance(grader, Mapping) and not isinstance(grader.get("type", ""), str):
            raise bad_request(f"Invalid grader: {where}.type must be a string naming the grader's type.",
                              param=_join(where, "type"))


def check(*, session: Session, settings: Settings, key: ApiKey, obj: Any, param: str = "grader") -> CheckedGrader:
    """The grader parsed and runnable here for `key` (see the module's docstring), else a 400 naming the field."""
    grader = parse(obj, param)
    subs = grader.graders.items() if isinstance(grader, MultiGrader) else [("", grader)]
    judges: dict[str, Servable] = {}
    for name, sub in subs:
        where = _join(param, f"graders.{name}" if name else "")
        if isinstance(sub, PythonGrader) and not settings.allow_python_graders:
            raise bad_request(PYTHON_DISABLED, param=_join(where, "type"), code="python_graders_disabled")
        if isinstance(sub, TextSimilarityGrader) and sub.evaluation_metric == "cosine":
            raise bad_request("evaluation_metric 'cosine' needs an embedding model, and this server serves none; "
                              "choose another metric (fuzzy_match, bleu, rouge_l, ...).",
                              param=_join(where, "evaluation_metric"), code="unsupported_value")
        if isinstance(sub, ScoreModelGrader | LabelModelGrader) and sub.model not in judges:
            judges[sub.model] = _judge_model(session, settings, key, sub.model, _join(where, "model"))
    return CheckedGrader(grader, judges)


def _judge_model(session: Session, settings: Settings, key: ApiKey, model_id: str, param: str) -> Servable:
    """A judge is a model this server serves and the key may use; any other name is a 400 at the grader's field."""
    try:
        if len(model_id) > MAX_MODEL_ID or CONTROL_CHARACTERS.search(model_id):  # no id is like this: not looked up
            raise APIError(404, f"The model '{model_id[:80]}' does not exist or you do not have access to it.",
                           code="model_not_found")
        return models.resolve_servable(session=session, settings=settings, key=key, model_id=model_id)
    except APIError as e:
        raise APIError(400, f"{e.message} A grader's model is one this server serves (GET /v1/models).",
                       param=param, code=e.code) from None


def validate(*, session: Session, settings: Settings, key: ApiKey,
             payload: GraderValidateRequest) -> GraderValidateResponse:
    checked = check(session=session, settings=settings, key=key, obj=payload.grader)
    return GraderValidateResponse(grader=checked.grader.to_openai())


def run(*, checked: CheckedGrader, payload: GraderRunRequest, settings: Settings,
        judge: ServedJudge | None) -> GraderRunResponse:
    """Grade `model_sample` against `item`. Blocking (a python grader runs for seconds, a judge generates): call it
    on a worker thread, where `judge` can reach the event loop."""
    started = time.perf_counter()
    try:
        result = grade(checked.grader, payload.model_sample, payload.item, judge=judge,
                       allow_python=settings.allow_python_graders, sandbox=sandbox_config(settings))
    except GraderUnavailableError as e:  # checked before: only the sandbox itself can be missing now
        raise APIError(503, f"{e} On this server: {ENV_PREFIX}PYTHON_GRADER_ISOLATION=best_effort.",
                       type="server_error", code="python_sandbox_unavailable") from None
    body = result.to_run_response(execution_time=time.perf_counter() - started)
    body["model_grader_token_usage_per_model"] = dict(judge.usage) if judge is not None else {}
    return GraderRunResponse.model_validate(body)


def _join(path: str, rest: str) -> str:
    return f"{path}.{rest}" if path and rest else path or rest
