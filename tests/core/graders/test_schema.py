"""Parsing OpenAI's grader JSON: the classes, the error paths, what is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unsloth_core.graders import (
    GraderValidationError,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    item_fields,
    missing_item_fields,
    requirements,
    validate_grader,
)

STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}


def problems(obj: object) -> list[tuple[str, str]]:
    with pytest.raises(GraderValidationError) as e:
        validate_grader(obj)  # type: ignore[arg-type]
    return e.value.problems


def test_openai_shapes_parse_and_echo() -> None:
    multi = {
        "type": "multi",
        "name": "tools",
        "graders": {
            "function_name": {"name": "function_name", "type": "string_check", "input": "get_acceptors",
                              "reference": "{{sample.output_tools[0].function.name}}", "operation": "eq"},
            "explanation": {"name": "judge", "type": "score_model", "model": "smollm2-135m-instruct",
                            "input": [{"role": "system", "content": "Grade 0 to 1."},
                                      {"role": "user", "type": "message",
                                       "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}"}]}],
                            "range": [0, 1], "sampling_params": {"temperature": 0.0, "seed": 1}},
        },
        "calculate_output": "0.5 * function_name + 0.5 * explanation",
    }
    grader = validate_grader(multi)
    assert isinstance(grader, MultiGrader) and isinstance(grader.graders["explanation"], ScoreModelGrader)
    assert grader.to_openai() == validate_grader(grader.to_openai()).to_openai()
    assert grader.to_openai()["graders"]["function_name"]["reference"] == "{{sample.output_tools[0].function.name}}"
    python = validate_grader({"type": "python", "source": "def grade(sample, item):\n    return 1.0",
                              "image_tag": "2025-05-08"})
    assert isinstance(python, PythonGrader) and python.label == "python"  # `name` may be left out


def test_errors_name_the_field_path() -> None:
    found = problems({"type": "multi", "calculate_output": "accuracy", "graders": {
        "accuracy": {"type": "string_check", "input": "a", "reference": "b", "operation": "contains"}}})
    assert found == [("graders.accuracy.operation", "Input should be 'eq', 'ne', 'like' or 'ilike'")]
    assert problems({**STRING_CHECK, "operaton": "eq"})[0][0] == "operaton"
    assert "unknown field" in problems({**STRING_CHECK, "operaton": "eq"})[0][1]
    assert problems({"type": "string_check"})[0][1] == "required"
    assert problems({"type": "nope"}) == [("type", "must be one of string_check, text_similarity, score_model, "
                                                   "label_model, python, multi; got 'nope'")]
    assert problems({"type": ["string_check"]})[0][0] == "type"  # unhashable: named, not a TypeError
    assert problems({"type": "multi", "calculate_output": "a", "graders": {"a": {"type": {}}}})[0][0] == \
        "graders.a.type"
    judge = {"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}]}
    assert problems({**judge, "range": [1, 0]})[0][0] == "range"
    assert problems({**judge, "sampling_params": {"max_tokens": 5}})[0][0] == "sampling_params.max_tokens"
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
    assert problems({**judge, "input": [image]}) == [
        ("input[0].content", "part 0: input_image is not supported: the judges served here read text only")]
    labels = {"type": "label_model", "model": "m", "input": [{"role": "user", "content": "x"}],
              "labels": ["good", "bad"], "passing_labels": ["great"]}
    assert problems(labels)[0][0] == "passing_labels"


def test_templates_are_checked_when_validated() -> None:
    assert problems({**STRING_CHECK, "reference": "{{itm.answer}}"}) == [
        ("reference", "unknown namespace 'itm' in {{itm.answer}}: the namespaces are item and sample")]
    assert "unknown sample field 'text'" in problems({**STRING_CHECK, "input": "{{ sample.text }}"})[0][1]
    assert problems({**STRING_CHECK, "input": "{{}}"})[0][0] == "input"


def test_multi_rules() -> None:
    sub = dict(STRING_CHECK)
    assert problems({"type": "multi", "calculate_output": "a", "graders": {"a": {"type": "multi"}}}) == [
        ("graders.a.type", "a multi grader cannot hold another multi grader")]
    assert problems({"type": "multi", "calculate_output": "x", "graders": {"my-key": sub}})[0][0] == "graders.my-key"
    assert problems({"type": "multi", "calculate_output": "b * 2", "graders": {"a": sub}}) == [
        ("calculate_output", "'b' is not a sub-grader; the sub-graders are: a")]


def test_python_source_is_checked_without_running_it() -> None:
    assert problems({"type": "python", "source": "def grade(s, i):\n    return 1.0 +"}) == [
        ("source", "source does not compile (line 2): invalid syntax")]
    assert problems({"type": "python", "source": "def score(s, i):\n    return 1.0"}) == [
        ("source", "source must define grade(sample, item) -> float at its top level")]
    assert "at most 262144" in problems({"type": "python", "source": "#" * 300_000})[0][1]
    # Validating never executes the source: a top level that would fail is only compiled.
    validate_grader({"type": "python", "source": "raise SystemExit\ndef grade(s, i):\n    return 1.0"})


def test_item_fields_and_requirements() -> None:
    grader = {"type": "multi", "calculate_output": "a + b + c", "graders": {
        "a": STRING_CHECK,
        "b": {"type": "text_similarity", "input": "{{item.answer.donors}}", "reference": "{{ item['a key'] }}",
              "evaluation_metric": "cosine"},
        "c": {"type": "label_model", "model": "judge-1", "labels": ["y", "n"], "passing_labels": ["y"],
              "input": [{"role": "user", "content": "{{item.options[1]}} {{sample.output_json.x}}"}]},
    }}
    assert item_fields(grader) == ["item.answer", "item.answer.donors", 'item["a key"]', "item.options[1]"]
    row = {"answer": {"donors": 3}, "a key": "k", "options": ["only one"]}
    assert missing_item_fields(grader, row) == ["item.options[1]"]
    assert missing_item_fields(grader, {"answer": "flat"}) == ["item.answer.donors", 'item["a key"]', "item.options"]
    needs = requirements(grader)
    assert needs.judge_models == ("judge-1",) and needs.embed and not needs.python


def test_validating_loads_no_torch_and_no_metric_library() -> None:
    # The API process validates graders; it must pay for neither torch nor the metrics.
    code = ("import sys; from unsloth_core.graders import validate_grader, grade; "
            f"validate_grader({STRING_CHECK!r}); "
            "grade(validate_grader({'type': 'string_check', 'input': 'a', 'reference': 'a', 'operation': 'eq'}), 'x'); "
            "loaded = [m for m in ('torch', 'nltk', 'sacrebleu', 'rouge_score', 'rapidfuzz') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
