"""The template language: paths into item and sample, values as text, and a clear error for a missing field."""

from __future__ import annotations

import pytest

from unsloth_core.graders.sample import Sample
from unsloth_core.graders.template import TemplateFieldError, parse_template, render


def ns(item: object, text: str = "out") -> dict[str, object]:
    return {"item": item, "sample": Sample.from_text(text).namespace()}


def test_paths_and_values() -> None:
    item = {"a": {"b": "deep"}, "n": 1.0, "flag": True, "list": ["x", {"y": 2}], "sp ace": "s", "none": None}
    namespaces = ns(item, '{"name": "Ann", "tags": ["t"]}')
    assert render("{{item.a.b}}|{{ item.n }}|{{item.flag}}", namespaces) == "deep|1.0|true"
    assert render("{{item.list[1].y}} {{item.list.0}} {{item['sp ace']}} {{item.none}}", namespaces) == "2 x s null"
    assert render("{{item.list}}", namespaces) == '["x", {"y": 2}]'
    assert render("{{sample.output_json.name}} {{sample.output_json.tags[-1]}}", namespaces) == "Ann t"
    assert render("{{sample.output_text}}", ns({}, "plain")) == "plain"
    assert render("{{sample.choices[0].message.content}}", ns({}, "plain")) == "plain"
    assert render("no placeholders {single} }}", ns({})) == "no placeholders {single} }}"


def test_missing_fields_are_named() -> None:
    with pytest.raises(TemplateFieldError) as e:
        render("{{item.answer.donors}}", ns({"answer": {"acceptors": 1}}))
    assert e.value.field == "item.answer.donors" and e.value.code == "invalid_variable_error"
    assert "the keys there: acceptors" in str(e.value)
    with pytest.raises(TemplateFieldError, match=r"item\.list\[3\]: index out of range \(the list has 1 items\)"):
        render("{{item.list[3]}}", ns({"list": [1]}))
    with pytest.raises(TemplateFieldError, match="cannot look inside a string"):
        render("{{item.a.b}}", ns({"a": "text"}))
    with pytest.raises(TemplateFieldError) as e:
        render("{{sample.output_json.name}}", ns({}, "not json"))
    assert e.value.code == "sample_parse_error" and e.value.field == "sample.output_json"
    with pytest.raises(TemplateFieldError, match=r"sample\.output_tools\[0\]: index out of range"):
        render("{{sample.output_tools[0].function.name}}", ns({}))


@pytest.mark.parametrize("bad", ["{{item}}", "{{foo.bar}}", "{{item.a[}}", "{{item.a b}}", "{{sample.nope}}",
                                 "{{ 1 + 2 }}"])
def test_malformed_references_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_template(bad)
