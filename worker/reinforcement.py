"""A reinforcement job's training method: GRPO whose reward is the job's grader; and the graders a supervised or
DPO job scores its checkpoints with.

The grader runs in this worker process: string and text-similarity checks in-line, python graders in the engine's
sandbox (with the data directory denied, and only when the operator allowed them; the API refused the job
otherwise, and a setting changed since then fails it here with the same message), and score_model / label_model
graders on a judge loaded here: the model the grader names, resolved as the job's owner would see it when calling
the API (a base, one of their fine-tunes, a checkpoint), kept loaded for the job's length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core.errors import APIError
from app.db.models import ApiKey, Job
from app.services import hyperparameters
from app.services.graders import sandbox_config
from app.services.models import resolve_servable
from worker.context import WorkerContext

if TYPE_CHECKING:
    from unsloth_core.graders import JudgeModel, LocalJudge
    from unsloth_core.rl.grader_reward import GraderReward
    from unsloth_core.rl.grpo import GRPO

ROLLOUTS_PER_LOG = 2  # prompts (each with its group of completions) kept per logged step


def grpo_method(ctx: WorkerContext, job: Job, device: Any = None) -> tuple[GRPO, LocalJudge | None]:
    """GRPO for the job, and the judge it loads (None when its grader needs none), to close when training ends."""
    from unsloth_core.rl.grpo import GRPO

    (reward,), judge = grader_rewards(ctx, job, [job.method["reinforcement"]["grader"]], device)
    args = hyperparameters.grpo_args(job.method, log_rollouts=ROLLOUTS_PER_LOG)
    return GRPO(reward, args), judge


def grader_rewards(ctx: WorkerContext, job: Job, graders: list[dict[str, Any]],
                   device: Any = None) -> tuple[list[GraderReward], LocalJudge | None]:
    """The graders as reward functions, sharing one judge (None when none needs one), to close when training
    ends: a reinforcement job's grader, or a supervised or DPO job's eval_graders."""
    from unsloth_core.graders import LocalJudge, requirements
    from unsloth_core.rl.grader_reward import GraderReward

    judge = None
    if any(requirements(g).judge_models for g in graders):
        judge = LocalJudge(lambda name: _judge_model(ctx, job.owner_id, name), device=device)
    rewards = [GraderReward(g, judge=judge, allow_python=ctx.settings.allow_python_graders,
                            sandbox=sandbox_config(ctx.settings)) for g in graders]
    return rewards, judge


def _judge_model(ctx: WorkerContext, owner_id: str, name: str) -> JudgeModel:
    """Where the named judge's files are, as the job's owner may use it; KeyError (the judge's contract for an
    unknown name) when it is not, or no longer, theirs to use."""
    from unsloth_core.graders import JudgeModel

    with ctx.sessions() as session:
        key = session.get(ApiKey, owner_id)
        if key is None:
            raise KeyError(f"the job's API key {owner_id} no longer exists")
        try:
            servable = resolve_servable(session=session, settings=ctx.settings, key=key, model_id=name)
        except APIError as e:
            raise KeyError(e.message) from None
    return JudgeModel(servable.base_path, servable.adapter_path)
