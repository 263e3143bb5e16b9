"""`/v1/evals` through the `openai` package's `client.evals` on both databases: evals created (criteria checked and
given ids), listed, updated, deleted; runs queued by task name, executed by the worker's task body in this process,
then read back with their counts and output items; cancel and delete; and the refusals, each naming its field.

The acceptance run: 8 items, a string_check criterion whose outcome each item decides whatever the random tiny model
writes (`{{sample.output_text}}` like `{{item.marker}}`: an empty marker is in every answer, a 40-character one in
none of 8 tokens), and a score_model judge (the tiny model itself), on the base model and on a fine-tune.
"""

from __future__ import annotations

import secrets
from typing import Any

import openai
import pytest

from tests.app.conftest import TINY, Backend, FineTune, jsonl

EVAL_TASK = "worker.tasks.run_eval"
NEVER = "q" * 40  # no 8-token answer holds it
MARKERS = ["", NEVER, "", "", NEVER, "", NEVER, ""]  # string_check: 5 pass, 3 fail
ITEM_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "marker": {"type": "string"}},
               "required": ["question", "marker"]}
STRING_CHECK = {"type": "string_check", "name": "marker", "input": "{{sample.output_text}}",
                "reference": "{{item.marker}}", "operation": "like"}
JUDGE = {"type": "score_model", "name": "judge", "model": TINY, "range": [0, 1], "pass_threshold": 0.5,
         "sampling_params": {"max_completions_tokens": 8, "temperature": 0},
         "input": [{"role": "user", "content": "Score from 0 to 1: {{item.question}} -> {{sample.output_text}}"}]}
TEMPLATE = {"type": "template", "template": [{"role": "developer", "content": "Answer briefly."},
                                             {"role": "user", "content": "{{item.question}}"}]}
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_completion_tokens": 8, "seed": 11}


def items() -> list[dict[str, Any]]:
    return [{"question": f"What is {k} + {k}?", "marker": marker} for k, marker in enumerate(MARKERS)]


def make_eval(client: openai.OpenAI, criteria: list[dict[str, Any]] | None = None) -> Any:
    config: Any = {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}
    testing: Any = criteria or [STRING_CHECK, JUDGE]
    return client.evals.create(name="sums", metadata={"team": "evals"}, data_source_config=config,
                               testing_criteria=testing)


def data_source(model: str, source: dict[str, Any], **extra: Any) -> Any:
    return {"type": "completions", "model": model, "source": source, "input_messages": TEMPLATE,
            "sampling_params": SAMPLING, **extra}


def run_worker(backend: Backend, run_id: str, attempt: int = 0) -> str:
    """What a worker does with the message: the task's body, in this process, on the backend's database."""
    from worker.context import WorkerContext
    from worker.evaluating import run_eval

    ctx = WorkerContext.build(backend.settings)
    try:
        return run_eval(ctx, run_id, attempt, f"test-worker/{secrets.token_hex(4)}")
    finally:
        ctx.close()


def bad_request(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


# ---- the acceptance run ----


@pytest.mark.parametrize("on", ["base", "fine_tune"])
def test_a_run_grades_every_item_with_each_criterion(backend: Backend, fine_tune: FineTune, on: str) -> None:
    client = backend.client(fine_tune.key)
    ev = make_eval(client)
    assert ev.object == "eval" and ev.id.startswith("eval_") and ev.name == "sums"
    assert ev.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA
    assert set(ev.data_source_config.schema_["properties"]) == {"item", "sample"}
    marker_id, judge_id = (c.id for c in ev.testing_criteria)
    assert marker_id.startswith("marker-") and judge_id.startswith("judge-")

    source: dict[str, Any]
    if on == "base":  # a JSONL file of OpenAI's {"item": ...} lines
        uploaded = client.files.create(file=("items.jsonl", jsonl([{"item": i} for i in items()])), purpose="evals")
        model, source = TINY, {"type": "file_id", "id": uploaded.id}
    else:  # the rows inline
        model, source = fine_tune.model, {"type": "file_content", "content": [{"item": i} for i in items()]}
    backend.queued_messages()
    run = client.evals.runs.create(ev.id, name=f"on {on}", data_source=data_source(model, source))
    assert (run.object, run.status, run.model, run.eval_id) == ("eval.run", "queued", model, ev.id)
    assert run.id.startswith("evalrun_") and run.report_url is None
    assert backend.queued_messages() == [(EVAL_TASK, [run.id, 0])]  # by task name, on the gpu queue

    assert run_worker(backend, run.id) == "completed"
    assert run_worker(backend, run.id) == "dropped"  # the same message again: nothing done
    done = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert done.status == "completed" and done.error is None
    outputs = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
    assert sorted(o.datasource_item_id for o in outputs) == list(range(8))  # each item graded once
    by_index = {o.datasource_item_id: o for o in outputs}
    for index, marker in enumerate(MARKERS):
        out = by_index[index]
        assert out.object == "eval.run.output_item" and out.run_id == run.id and out.eval_id == ev.id
        assert out.datasource_item == items()[index]
        sample = out.sample
        assert sample.input[0].role == "developer" and sample.input[1].content == f"What is {index} + {index}?"
        assert sample.output[0].role == "assistant" and isinstance(sample.output[0].content, str)
        assert (sample.model, sample.temperature, sample.top_p, sample.max_completion_tokens, sample.seed) == (
            model, 0.7, 0.9, 8, 11 + index)
        assert sample.finish_reason in ("stop", "length") and 0 < sample.usage.completion_tokens <= 8
        assert sample.usage.total_tokens == sample.usage.prompt_tokens + sample.usage.completion_tokens
        marker_result, judge_result = out.results
        assert (marker_result.name, marker_result.passed, marker_result.score) == (
            marker_id, marker == "", 1.0 if marker == "" else 0.0)
        assert judge_result.name == judge_id and 0.0 <= judge_result.score <= 1.0
        assert judge_result.passed == (judge_result.score >= 0.5 and not judge_result.errors)
        assert out.status == ("pass" if marker_result.passed and judge_result.passed else "fail")

    counts = done.result_counts
    judge_passed = sum(by_index[i].results[1].passed for i in range(8))
    assert (counts.total, counts.errored) == (8, 0)
    assert counts.passed == sum(o.status == "pass" for o in outputs) and counts.passed + counts.failed == 8
    assert [(r.testing_criteria, r.passed, r.failed) for r in done.per_testing_criteria_results] == [
        (marker_id, 5, 3), (judge_id, judge_passed, 8 - judge_passed)]
    (usage,) = done.per_model_usage
    assert (usage.run_model_name, usage.invocation_count) == (model, 8)
    assert usage.completion_tokens == sum(o.sample.usage.completion_tokens for o in outputs)

    passing = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="pass"))
    assert len(passing) == counts.passed and all(o.status == "pass" for o in passing)
    one = client.evals.runs.output_items.retrieve(outputs[3].id, eval_id=ev.id, run_id=run.id)
    assert one.id == outputs[3].id and one.model_dump() == outputs[3].model_dump()


def test_an_item_the_template_cannot_fill_is_errored_and_the_run_goes_on(backend: Backend) -> None:
    client = backend.client()
    ev = make_eval(client, [STRING_CHECK])
    rows = [{"item": {"question": "Hi", "marker": "", "hint": "short"}}, {"item": {"question": "Yo", "marker": ""}}]
    template = {"type": "template", "template": [{"role": "user", "content": "{{item.question}} ({{item.hint}})"}]}
    run = client.evals.runs.create(ev.id, data_source=data_source(
        TINY, {"type": "file_content", "content": rows}, input_messages=template))
    assert run.name == TINY  # a run's name defaults to its model's
    assert run_worker(backend, run.id) == "completed"
    done = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert (done.result_counts.total, done.result_counts.errored, done.result_counts.passed) == (2, 1, 1)
    errored = next(o for o in client.evals.runs.output_items.list(run.id, eval_id=ev.id) if o.datasource_item_id == 1)
    assert errored.status == "fail" and errored.results == [] and errored.sample.output == []
    assert errored.sample.error.code == "invalid_item" and "item.hint" in errored.sample.error.message


# ---- evals and runs as objects ----


def test_evals_are_listed_updated_and_deleted_and_private(backend: Backend) -> None:
    client = backend.client(backend.new_key("evals-crud"))
    first, second = make_eval(client), make_eval(client)
    listed = client.evals.list(limit=1)
    assert [e.id for e in listed.data] == [first.id] and listed.has_more
    assert [e.id for e in client.evals.list(order="desc")] == [second.id, first.id]
    assert [e.id for e in client.evals.list(after=first.id)] == [second.id]
    renamed = client.evals.update(first.id, name="renamed", metadata={"v": "2"})
    assert (renamed.name, renamed.metadata) == ("renamed", {"v": "2"})
    assert [c.model_dump() for c in renamed.testing_criteria] == [c.model_dump() for c in first.testing_criteria]
    assert client.evals.retrieve(first.id).name == "renamed"

    with pytest.raises(openai.NotFoundError):
        backend.client().evals.retrieve(first.id)  # another key's eval does not exist for it
    rows = [{"item": {"question": "Hi", "marker": ""}}]
    queued = client.evals.runs.create(second.id, data_source=data_source(
        TINY, {"type": "file_content", "content": rows}))
    refused = bad_request(lambda: client.evals.delete(second.id))
    assert refused.code == "eval_run_in_progress" and queued.id in refused.message
    assert [r.id for r in client.evals.runs.list(second.id, status="queued")] == [queued.id]
    canceled = client.evals.runs.cancel(queued.id, eval_id=second.id)
    assert canceled.status == "canceled"
    assert run_worker(backend, queued.id) == "dropped"  # a canceled run's message claims nothing
    assert list(client.evals.runs.list(second.id, status="queued")) == []
    deleted = client.evals.runs.delete(queued.id, eval_id=second.id)
    assert (deleted.deleted, deleted.run_id) == (True, queued.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(queued.id, eval_id=second.id)
    gone = client.evals.delete(second.id)
    assert (gone.deleted, gone.eval_id, gone.object) == (True, second.id, "eval.deleted")
    assert [e.id for e in client.evals.list()] == [first.id]


def test_active_runs_are_capped_per_key(backend: Backend) -> None:
    client = backend.client(backend.new_key("evals-cap"))
    ev = make_eval(client, [STRING_CHECK])
    source = {"type": "file_content", "content": [{"item": {"question": "Hi", "marker": ""}}]}
    runs = [client.evals.runs.create(ev.id, data_source=data_source(TINY, source))
            for _ in range(backend.settings.max_active_eval_runs_per_key)]
    with pytest.raises(openai.RateLimitError) as caught:
        client.evals.runs.create(ev.id, data_source=data_source(TINY, source))
    assert caught.value.code == "too_many_active_eval_runs"
    for run in runs:
        client.evals.runs.cancel(run.id, eval_id=ev.id)


# ---- refusals, each naming its field ----


@pytest.mark.parametrize(("criterion", "param", "code"), [
    ({**STRING_CHECK, "operation": "equals"}, "testing_criteria[0].operation", "invalid_value"),
    ({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "{{item.marker}}",
      "evaluation_metric": "fuzzy_match"}, "testing_criteria[0].pass_threshold", "missing_required_parameter"),
    ({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n", "pass_threshold": 1},
     "testing_criteria[0].type", "python_graders_disabled"),
    ({**JUDGE, "model": "no-such-model"}, "testing_criteria[0].model", "model_not_found"),
])
def test_a_criterion_that_cannot_run_is_refused(client: openai.OpenAI, criterion: dict[str, Any], param: str,
                                                code: str) -> None:
    error = bad_request(lambda: make_eval(client, [criterion]))
    assert (error.param, error.code) == (param, code), error.message


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"model": "no-such-model"}, "data_source.model", "model_not_found"),
    ({"source": {"type": "file_id", "id": "file-nope"}}, "data_source.source.id", "file_not_found"),
    ({"source": {"type": "file_content", "content": [{"item": {"question": "Hi"}}]}},
     "data_source.source.content", "invalid_data_source"),
    ({"source": {"type": "file_content", "content": [{"item": {"question": 3, "marker": ""}}]}},
     "data_source.source.content", "invalid_data_source"),
    ({"input_messages": {"type": "template", "template": [{"role": "user", "content": "{{sample.output_text}}"}]}},
     "data_source.input_messages.template[0].content", "invalid_data_source"),
    ({"sampling_params": {"max_completion_tokens": 10**6}}, "data_source.sampling_params.max_completion_tokens",
     "invalid_value"),
    ({"type": "jsonl"}, "data_source.type", None),
])
def test_a_run_that_cannot_run_is_refused(client: openai.OpenAI, change: dict[str, Any],
                                          param: str, code: str | None) -> None:
    ev = make_eval(client, [STRING_CHECK])
    source = {"type": "file_content", "content": [{"item": {"question": "Hi", "marker": ""}}]}
    body: Any = {**data_source(TINY, source), **change}
    error = bad_request(lambda: client.evals.runs.create(ev.id, data_source=body))
    assert error.param == param and (code is None or error.code == code), error.message


def test_a_file_of_other_lines_names_the_line(client: openai.OpenAI) -> None:
    ev = make_eval(client, [STRING_CHECK])
    bad = client.files.create(file=("items.jsonl", b'{"item": {"question": "a", "marker": ""}}\n[1, 2]\n'),
                              purpose="evals")
    error = bad_request(lambda: client.evals.runs.create(ev.id, data_source=data_source(
        TINY, {"type": "file_id", "id": bad.id})))
    assert error.param == "data_source.source.id" and "line 2" in error.message
