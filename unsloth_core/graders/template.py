"""OpenAI's grader template language: `{{ namespace.path }}` inside any grader string.

Two namespaces: `item` (the dataset row: a training line, or the `item` of a graders/run call) and `sample` (the
model's output: `output_text`, `output_json`, `output_tools`, `choices`, `output_audio`). A path walks JSON with
dots and brackets, as OpenAI's guide writes it: `{{item.reference_answer}}`, `{{ item.answer.donors }}`,
`{{sample.output_json.name}}`, `{{sample.output_tools[0].function.name}}`, `{{item["a key"]}}`; a dotted
number indexes a list too (`item.options.0`). A string value is inserted as it is, anything else as JSON
(`1.0`, `true`, `["a", "b"]`).

A template is parsed once, when its grader is validated: a `{{ }}` that is not such a reference is an error then. A
reference that finds nothing at grading time raises `TemplateFieldError` naming the field (`item.answer.donors`),
which the grader records on that sample.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from unsloth_core.graders.result import ErrorCode

NAMESPACES = ("item", "sample")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices", "output_audio")

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# One path step: .name (any run of characters that are not '.', '[', ']', spaces or braces), [0], ['key'], ["key"].
_STEP = re.compile(r"""\.([^.\[\]\s{}]+)|\[\s*(-?\d+)\s*\]|\[\s*'([^']*)'\s*\]|\[\s*"([^"]*)"\s*\]""")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Step = str | int


class TemplateFieldError(LookupError):
    """A reference that found nothing. `field` is the path as far as it resolved plus the failing step; `code` is
    OpenAI's error flag for it: `sample_parse_error` when the sample has no JSON to look in, else
    `invalid_variable_error`."""

    def __init__(self, field: str, message: str, code: ErrorCode = "invalid_variable_error") -> None:
        self.field = field
        self.code = code
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Reference:
    """One `{{ namespace.path }}`: `path` holds the steps after the namespace (names and list indices)."""

    namespace: str
    path: tuple[Step, ...]

    def __str__(self) -> str:
        return format_path(self.namespace, self.path)


def format_path(namespace: str, path: tuple[Step, ...]) -> str:
    out = namespace
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif re.fullmatch(r"[^.\[\]\s{}\"']+", step):
            out += f".{step}"
        else:
            out += f"[{json.dumps(step)}]"
    return out


def parse_reference(text: str) -> Reference:
    """`item.a.b` -> Reference('item', ('a', 'b')). Raises ValueError with what is wrong."""
    body = text.strip()
    head = _NAME.match(body)
    if head is None:
        raise ValueError(f"{{{{{text}}}}} is not a reference: write {{{{item.<field>}}}} or {{{{sample.<field>}}}}")
    namespace = head.group(0)
    if namespace not in NAMESPACES:
        raise ValueError(f"unknown namespace {namespace!r} in {{{{{body}}}}}: the namespaces are item and sample")
    path: list[Step] = []
    pos = head.end()
    while pos < len(body):
        step = _STEP.match(body, pos)
        if step is None:
            raise ValueError(f"cannot read {{{{{body}}}}} from {body[pos:]!r}: steps are .name, [0] or ['key']")
        name, index, single, double = step.groups()
        path.append(int(index) if index is not None else next(s for s in (name, single, double) if s is not None))
        pos = step.end()
    if not path:
        raise ValueError(f"{{{{{body}}}}} names no field: write {namespace}.<field>")
    if namespace == "sample" and path[0] not in SAMPLE_FIELDS:
        raise ValueError(f"unknown sample field {path[0]!r} in {{{{{body}}}}}: one of {', '.join(SAMPLE_FIELDS)}")
    return Reference(namespace, tuple(path))


@dataclass(frozen=True)
class Template:
    """A grader string split into literal text and references."""

    source: str
    parts: tuple[str | Reference, ...]

    @property
    def references(self) -> Iterator[Reference]:
        return (part for part in self.parts if isinstance(part, Reference))

    def render(self, namespaces: Mapping[str, Any]) -> str:
        """Substitute every reference from `namespaces` ({'item': ..., 'sample': ...})."""
        return "".join(part if isinstance(part, str) else to_text(resolve(part, namespaces)) for part in self.parts)


@lru_cache(maxsize=4096)
def parse_template(source: str) -> Template:
    """Split `source` at its `{{ }}`s. Raises ValueError for one that is not a valid reference. Cached: a grader's
    strings are parsed once, however many samples it grades."""
    parts: list[str | Reference] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(source):
        if match.start() > pos:
            parts.append(source[pos : match.start()])
        parts.append(parse_reference(match.group(1)))
        pos = match.end()
    if pos < len(source):
        parts.append(source[pos:])
    return Template(source, tuple(parts))


def resolve(ref: Reference, namespaces: Mapping[str, Any]) -> Any:
    """The value `ref` names. Raises TemplateFieldError at the first step that finds nothing."""
    value = namespaces.get(ref.namespace)
    if value is None:
        raise TemplateFieldError(ref.namespace, "not given")
    walked: list[Step] = []
    for step in ref.path:
        where = format_path(ref.namespace, (*walked, step))
        walked.append(step)
        if ref.namespace == "sample" and walked == ["output_json"] and value.get("output_json") is None:
            raise TemplateFieldError(where, "the sample is not JSON (output_json is set only for a JSON output)",
                                     code="sample_parse_error")
        value = _step(value, step, where)
    return value


def _step(value: Any, step: Step, where: str) -> Any:
    if isinstance(value, Mapping):
        key = str(step)
        if key not in value:
            keys = ", ".join(sorted(map(str, value))[:20]) or "none"
            raise TemplateFieldError(where, f"missing (the keys there: {keys})")
        return value[key]
    if isinstance(value, list):
        index = step if isinstance(step, int) else int(step) if step.lstrip("-").isdigit() else None
        if index is None:
            raise TemplateFieldError(where, f"a list is indexed by a number, not {step!r}")
        if not -len(value) <= index < len(value):
            raise TemplateFieldError(where, f"index out of range (the list has {len(value)} items)")
        return value[index]
    raise TemplateFieldError(where, f"cannot look inside a {json_type(value)}")


def render(source: str, namespaces: Mapping[str, Any]) -> str:
    """Parse (cached) and render `source`. Raises TemplateFieldError for a field that is not there."""
    return parse_template(source).render(namespaces)


def to_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__
