"""The multi grader and its calculate_output evaluator: arithmetic as OpenAI defines it, and nothing else."""

from __future__ import annotations

import math

import pytest

from unsloth_core.graders import grade
from unsloth_core.graders.formula import FormulaError, parse_formula


def value(formula: str, **values: float) -> float:
    return parse_formula(formula, values).evaluate(values)


def test_arithmetic_and_functions() -> None:
    assert value("(name + email) / 2", name=0.8, email=1.0) == pytest.approx(0.9)
    assert value("a ^ 2", a=3) == 9.0 and value("a ** 2", a=3) == 9.0
    assert value("2 * a ^ 2", a=3) == 18.0  # ^ binds tighter than *, as power does
    assert value("-a ^ 2", a=3) == -9.0
    assert value("min(a, b, 0.5) + max(a, b) + abs(-a)", a=0.2, b=0.9) == pytest.approx(0.2 + 0.9 + 0.2)
    assert value("floor(a) + ceil(a) + sqrt(b) + exp(0) + log(1) + log(8, 2)", a=1.5, b=4) == 1 + 2 + 2 + 1 + 0 + 3
    assert value("(100 - abs(expected - actual)) / 100", expected=80, actual=65) == 0.85


@pytest.mark.parametrize(("formula", "message"), [
    ("__import__('os')", "__import__ is not a function here"),
    ("a.__class__", "attribute access (x.y) is not allowed"),
    ("a.__class__.__mro__[1].__subclasses__()", "is not a function here"),
    ("a[0]", "subscripting (x[...]) is not allowed"),
    ("'text'", "'text' is not a number"),
    ("a if a else 1", "if/else is not allowed"),
    ("a < 1", "a comparison is not allowed"),
    ("(lambda: 1)()", "is not a function here"),
    ("a // 2", "operator // is not allowed"),
    ("a % 2", "operator % is not allowed"),
    ("max(a, key=a)", "max() takes plain arguments only"),
    ("abs(a, a)", "abs() takes 1 arguments, not 2"),
    ("b + 1", "'b' is not a sub-grader; the sub-graders are: a"),
    ("max + 1", "'max' is not a sub-grader (it is a function"),
    ("True + a", "True is not a number"),
    ("(a := 1)", "an assignment (:=) is not allowed"),
    ("a +", "cannot parse calculate_output"),
    ("", "calculate_output is empty"),
    ("1" * 400 + "e5" + " + a", "is not a finite float"),
    ("(" * 80 + "a" + ")" * 80 + "+ -" * 70 + "a", "nests deeper"),
])
def test_refused(formula: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.").replace("*", r"\*").replace("+", r"\+")
                       .replace("^", r"\^")):
        parse_formula(formula, {"a"})


@pytest.mark.parametrize("formula", ["a / 0", "log(0)", "sqrt(-1)", "exp(1000)", "9 ^ 9 ^ 9", "(-8) ^ (1/3)"])
def test_values_it_cannot_compute(formula: str) -> None:
    with pytest.raises(FormulaError):
        parse_formula(formula, {"a"}).evaluate({"a": 1.0})


def test_multi_grader() -> None:
    grader = {"type": "multi", "name": "contact", "calculate_output": "(name + email) / 2", "graders": {
        "name": {"name": "name_grader", "type": "text_similarity", "input": "{{sample.output_json.name}}",
                 "reference": "{{item.name}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.9},
        "email": {"name": "email_grader", "type": "string_check", "input": "{{sample.output_json.email}}",
                  "reference": "{{item.email}}", "operation": "eq"},
    }}
    item = {"name": "John Doe", "email": "john.doe@gmail.com"}
    result = grade(grader, '{"name": "Jon Doe", "email": "john.doe@gmail.com"}', item)
    # fuzzy_match("Jon Doe", "John Doe") after lower-casing: InDel distance 1 over 15 characters -> 14/15.
    assert result.sub_scores == pytest.approx({"name": 14 / 15, "email": 1.0})
    assert result.score == pytest.approx((14 / 15 + 1) / 2) and not result.errors
    run = result.to_run_response(execution_time=0.1)
    assert run["reward"] == result.score and run["sub_rewards"] == result.sub_scores
    assert run["metadata"]["errors"]["formula_parse_error"] is False
    # A sub-grader that cannot grade scores 0 in the formula and its error is kept, with its key.
    result = grade(grader, "not json", item)
    assert result.score == 0.0 and {e.grader for e in result.errors} == {"name", "email"}
    assert result.errors[0].code == "sample_parse_error"
    bad = grade({**grader, "calculate_output": "name / (email - 1)"}, '{"name": "x", "email": "john.doe@gmail.com"}',
                item)
    assert bad.score == 0.0 and bad.errors[-1].code == "other_error" and "division by zero" in bad.errors[-1].message
    assert math.isfinite(bad.score)
