"""LocalJudge: judge models loaded in this process by name (a base, a fine-tune as base + adapter), each batch
generated in one call, answers held to the grader's JSON schema, and an unknown name failing its samples."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from tests.helpers import tiny_model_dir
from unsloth_core.checkpoint import load_model
from unsloth_core.graders import JudgeModel, JudgeRequest, LocalJudge, UnknownJudgeModelError, grade_batch
from unsloth_core.lora import LoRAConfig, inject, lora_layers, save_adapter

GREEDY = {"temperature": 0, "max_completions_tokens": 12}
VERDICT = {"type": "object", "properties": {"grade": {"type": "integer", "minimum": 0, "maximum": 9},
                                            "label": {"enum": ["pass", "fail"]}},
           "required": ["grade", "label"], "additionalProperties": False}
SCORE = {
    "type": "score_model", "name": "judge", "model": "ft:tiny:judge", "range": [0, 10],
    "input": [{"role": "developer", "content": "Grade the answer against {{item.reference}}."},
              {"role": "user", "content": "Answer: {{sample.output_text}}"}],
    "sampling_params": {"temperature": 0, "max_completions_tokens": 64},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, JudgeModel]:
    root = tmp_path_factory.mktemp("judges")
    base = tiny_model_dir(root / "base", seed=1, std=0.3)
    model = inject(load_model(base), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                   seed=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3, generator=g)  # a trained-looking adapter: B not zero
    adapter = save_adapter(model, root / "ft")
    return {"tiny": JudgeModel(base), "ft:tiny:judge": JudgeModel(str(base), str(adapter))}


@pytest.fixture(scope="module")
def judge(models: dict[str, JudgeModel]) -> LocalJudge:
    return LocalJudge(models.__getitem__, device="cpu", max_loaded=2)


def ask(model: str, text: str, params: dict[str, Any] | None = None, schema: dict[str, Any] | None = None
        ) -> JudgeRequest:
    response_format = {} if schema is None else {"type": "json_schema",
                                                 "json_schema": {"name": "v", "strict": True, "schema": schema}}
    return JudgeRequest(model, ({"role": "system", "content": "You grade."}, {"role": "user", "content": text}),
                        dict(GREEDY if params is None else params), response_format)


def test_one_answer_per_request_in_order_as_each_alone(judge: LocalJudge) -> None:
    requests = [ask("tiny", "alpha"), ask("ft:tiny:judge", "alpha"), ask("tiny", "a much longer question"),
                ask("ft:tiny:judge", "b")]
    texts = judge(requests)
    assert texts == [judge([r])[0] for r in requests]
    assert len(set(texts)) == 4


def test_the_adapter_changes_the_answers(judge: LocalJudge, models: dict[str, JudgeModel]) -> None:
    questions = ["is 2 + 2 four?", "rate this", "x"]
    base = judge([ask("tiny", q) for q in questions])
    tuned = judge([ask("ft:tiny:judge", q) for q in questions])
    assert all(b != t for b, t in zip(base, tuned))
    assert set(judge.loaded()) == {models["tiny"], models["ft:tiny:judge"]}


def test_sampling_params_are_honoured(judge: LocalJudge) -> None:
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 5, "max_completions_tokens": 6, "reasoning_effort": "high"}
    first, again, other, longer = judge([ask("tiny", "q", sampled), ask("tiny", "q", sampled),
                                         ask("tiny", "q", {**sampled, "seed": 6}),
                                         ask("tiny", "q", {**sampled, "max_completions_tokens": 30})])
    assert first == again != other
    # The same draws, cut at 6 tokens (a character the cut splits in two ends the short one as U+FFFD).
    assert len(first) < len(longer) and longer.startswith(first.rstrip("\ufffd"))


def test_answers_are_held_to_the_response_format(judge: LocalJudge) -> None:
    requests = [ask(model, q, {"temperature": 1.0, "seed": seed, "max_completions_tokens": 64}, VERDICT)
                for model in ("tiny", "ft:tiny:judge") for seed, q in enumerate(["good?", "bad?", "why?"])]
    for text in judge(requests):
        jsonschema.validate(json.loads(text), VERDICT)


def test_a_schema_the_grammar_engine_cannot_hold_answers_free(judge: LocalJudge) -> None:
    with pytest.warns(RuntimeWarning, match="dependentSchemas"):
        held, free = judge([ask("tiny", "q", schema={"type": "object", "dependentSchemas": {"a": {}}}),
                            ask("tiny", "q")])
    assert held == free


def test_an_unknown_model_is_named_and_its_samples_score_zero(judge: LocalJudge) -> None:
    with pytest.raises(UnknownJudgeModelError, match="'ft:tiny:gone'"):
        judge([ask("tiny", "q"), ask("ft:tiny:gone", "q")])
    results = grade_batch({**SCORE, "model": "ft:tiny:gone"}, ["a", "b"], [{"reference": "R"}] * 2, judge=judge)
    assert [r.score for r in results] == [0.0, 0.0]
    assert all(r.errors[0].code == "model_grader_server_error" and "ft:tiny:gone" in r.errors[0].message
               for r in results)


def test_score_model_end_to_end(judge: LocalJudge) -> None:
    results = grade_batch(SCORE, ["Paris", "Lyon", "Berlin", "I do not know"], [{"reference": "Paris"}] * 4,
                          judge=judge)
    assert all(0 <= r.score <= 10 for r in results)
    read = [r for r in results if not r.errors]  # held to the schema, the random judge's answers parse
    assert read and all(r.score == min(max(r.details["judge_score"], 0), 10) for r in read)
    assert all(json.loads(r.details["judge_output"]).keys() == {"steps", "result"} for r in read)


def test_the_least_recently_used_model_is_dropped_and_its_base_shared(models: dict[str, JudgeModel]) -> None:
    one = LocalJudge(models.__getitem__, device="cpu")
    base = one([ask("tiny", "q")])
    weights = one._loaded[models["tiny"]].base
    tuned = one([ask("ft:tiny:judge", "q")])
    assert one.loaded() == [models["ft:tiny:judge"]]
    assert one._loaded[models["ft:tiny:judge"]].base is weights  # the adapter went on the loaded base, not a copy
    assert one([ask("tiny", "q")]) == base and one([ask("ft:tiny:judge", "q")]) == tuned
    one.close()
    assert one.loaded() == []
