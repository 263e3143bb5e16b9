"""Continued fine-tuning through the job API and the training task: an SFT job, a DPO job from its fine-tune, a
reinforcement job from a checkpoint; each trains on the adapter it continues, keeps its rank, is named after the
base, records its lineage (parent, root) and is servable; shapes that cannot continue are refused by field."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.core.errors import APIError
from app.schemas.jobs import JobCreate
from app.services import jobs, lifecycle, models
from app.services.hyperparameters import stored_hyperparameters
from tests.worker.conftest import TINY, WorkerEnv, fact_rows
from tests.worker.test_training import owner
from worker import training


def create(env: WorkerEnv, model: str, training_file: str, method: dict[str, Any], key: Any = None) -> str:
    payload = JobCreate.model_validate({"model": model, "training_file": training_file, "seed": 7,
                                        "method": method})
    with env.ctx.sessions() as session:
        return jobs.create_job(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                               key=key or env.key, payload=payload, idempotency_key=secrets.token_hex(8),
                               retry_count=0).id


def run(env: WorkerEnv, job_id: str) -> str:
    return training.run_job(env.ctx, job_id, 0, owner())


def preference_file(env: WorkerEnv) -> str:
    from unsloth_core.data.synthetic import made_up_facts, preference_rows

    return env.upload(preference_rows(made_up_facts(4)))


def final(env: WorkerEnv, job_id: str) -> dict[str, torch.Tensor]:
    (path,) = sorted(lifecycle.job_dir(env.settings, job_id).glob("attempt-*/final"))
    return load_file(str(path / "adapter_model.safetensors"))


HP = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "max_seq_length": 128, "n_checkpoints": 2}


def test_sft_then_dpo_from_its_fine_tune_then_rl_from_a_checkpoint(env: WorkerEnv) -> None:
    sft = create(env, TINY, env.upload(fact_rows(8)), {"type": "supervised", "supervised": {"hyperparameters": HP}})
    assert run(env, sft) == "succeeded"
    sft_model = env.job(sft).fine_tuned_model
    assert sft_model is not None

    dpo_hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "max_seq_length": 128}  # rank: "auto"
    dpo = create(env, sft_model, preference_file(env), {"type": "dpo", "dpo": {"hyperparameters": dpo_hp}})
    assert stored_hyperparameters(env.job(dpo).method)["lora_r"] == 4  # the continued adapter's rank
    assert run(env, dpo) == "succeeded", env.job(dpo).error
    dpo_model = env.job(dpo).fine_tuned_model
    assert dpo_model == f"ft:{TINY}::{dpo}"  # named after the base, as OpenAI names a fine-tune of a fine-tune
    assert any(not torch.equal(final(env, dpo)[k], v) for k, v in final(env, sft).items())

    with env.ctx.sessions() as session:
        listed = {m.id: m for m in models.list_models(session=session, settings=env.settings, key=env.key).data}
        servable = models.resolve_servable(session=session, settings=env.settings, key=env.key, model_id=dpo_model)
    assert (listed[dpo_model].parent, listed[dpo_model].root) == (sft_model, TINY)
    checkpoint = next(m for m in listed.values() if m.parent == dpo_model and m.kind == "checkpoint")
    assert checkpoint.root == TINY
    from unsloth_core.checkpoint import load_model
    from unsloth_core.generate import Generator
    from unsloth_core.lora import load_adapter
    from unsloth_core.sampling import SamplingParams
    from unsloth_core.tokenizer import Tokenizer

    assert servable.adapter_path is not None
    served = load_adapter(load_model(servable.base_path), servable.adapter_path)
    tokenizer = Tokenizer.from_dir(servable.base_path)
    out = Generator(served, tokenizer).generate([tokenizer.encode("Hello")], SamplingParams(max_new_tokens=3))
    assert len(out[0].token_ids) >= 1

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}], "want": "a"} for i in range(4)]
    grader = {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "{{item.want}}",
              "operation": "like"}
    rl_hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "max_seq_length": 96, "num_generations": 2,
             "max_completion_length": 4}
    rl = create(env, checkpoint.id, env.upload(rows),
                {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": rl_hp}})
    assert run(env, rl) == "succeeded", env.job(rl).error
    with env.ctx.sessions() as session:
        rl_row = models.get_model(session=session, settings=env.settings, key=env.key,
                                  model_id=env.job(rl).fine_tuned_model or "")
    assert (rl_row.parent, rl_row.root) == (checkpoint.id, TINY)


def test_shapes_that_cannot_continue_are_refused_by_field(env: WorkerEnv) -> None:
    sft = create(env, TINY, env.upload(fact_rows(4)), {"type": "supervised", "supervised": {"hyperparameters": HP}})
    assert run(env, sft) == "succeeded"
    sft_model = env.job(sft).fine_tuned_model or ""
    data = env.upload(fact_rows(4))
    for hp, param in (({"lora_r": 8}, "lora_r"), ({"lora_target_modules": ["q_proj"]}, "lora_target_modules")):
        with pytest.raises(APIError) as e:
            create(env, sft_model, data, {"type": "supervised", "supervised": {"hyperparameters": {**HP, **hp}}})
        assert (e.value.param, e.value.code) == (f"method.supervised.hyperparameters.{param}", "invalid_value")
    with env.ctx.sessions() as session:
        from app.services import keys

        other, _ = keys.create_key(session=session, name="someone-else")
    with pytest.raises(APIError) as e:  # another key's fine-tune is not there for this key
        create(env, sft_model, data, {"type": "supervised", "supervised": {"hyperparameters": HP}}, key=other)
    assert (e.value.param, e.value.code) == ("model", "model_not_found")
