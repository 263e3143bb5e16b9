"""What an eval run reads: its data source's items (inline `file_content` rows, or a JSONL file's lines), checked
against the eval's item schema, and each item's chat messages built from the run's `input_messages`.

A file's line is OpenAI's `{"item": {...}}` (a `sample` beside it is accepted and unused: a completions run samples
its own), or the item object itself. Items are numbered from 0 in the order given: that number is an output item's
`datasource_item_id`, and a resumed run skips the numbers already graded.

The item schema is checked in the part every eval relies on: the item is an object, holds the schema's top-level
`required` fields, and each top-level property has its declared JSON type. Deeper JSON Schema keywords are not
enforced (a template that reads a field an item lacks marks that item errored when the run samples it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from unsloth_core.graders.template import parse_reference, parse_template, render, resolve

SOURCE_ID = "data_source.source.id"
JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "number": (int, float), "integer": (int,),
                                           "boolean": (bool,), "object": (dict,), "array": (list,),
                                           "null": (type(None),)}


class ItemsError(ValueError):
    """The data source, or one item of it, cannot be used; `param` names the request field at fault."""

    def __init__(self, message: str, param: str, code: str = "invalid_data_source") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# ---- items ----


def from_content(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(row["item"]) for row in rows]


def from_file(path: Path, file_id: str, limit: int) -> list[dict[str, Any]]:
    """Every item of a JSONL file, at most `limit`. Raises ItemsError naming the first bad line."""
    return list(_file_items(path, file_id, limit))


def _file_items(path: Path, file_id: str, limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ItemsError(f"File {file_id}, line {number}: not a JSON object ({type(e).__name__}).",
                                 SOURCE_ID) from None
            if not isinstance(row, dict):
                raise ItemsError(f"File {file_id}, line {number}: an item is a JSON object, not "
                                 f"{type(row).__name__}.", SOURCE_ID)
            n += 1
            if n > limit:
                raise ItemsError(f"File {file_id} holds more than {limit} items, the most one run takes; split it.",
                                 SOURCE_ID)
            wrapped = isinstance(row.get("item"), dict) and set(row) <= {"item", "sample"}
            yield row["item"] if wrapped else row


def check_schema(items: list[dict[str, Any]], schema: Mapping[str, Any], param: str) -> None:
    """Raises ItemsError for the first item that lacks a required field or holds one of the wrong JSON type."""
    required = [r for r in schema.get("required") or [] if isinstance(r, str)]
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        properties = {}
    for index, item in enumerate(items):
        missing = [name for name in required if name not in item]
        if missing:
            raise ItemsError(f"Item {index} lacks {', '.join(missing)}, required by the eval's item_schema.", param)
        if "\\u0000" in json.dumps(item):  # PostgreSQL stores no NUL in JSON, and no model reads one
            raise ItemsError(f"Item {index} holds a NUL character (\\u0000); remove it.", param)
        for name, spec in properties.items():
            if name in item and isinstance(spec, Mapping) and not _has_type(item[name], spec.get("type")):
                raise ItemsError(f"Item {index}: {name} is {_json_type(item[name])}; the eval's item_schema says "
                                 f"{spec.get('type')}.", param)


def _has_type(value: Any, declared: Any) -> bool:
    names = declared if isinstance(declared, list) else [declared]
    if not all(isinstance(n, str) and n in JSON_TYPES for n in names):
        return True  # no type, or one this check does not know: not enforced
    if isinstance(value, bool):
        return "boolean" in names
    return any(isinstance(value, JSON_TYPES[n]) for n in names)


def _json_type(value: Any) -> str:
    return next((n for n, types in JSON_TYPES.items() if isinstance(value, types)
                 and not (isinstance(value, bool) and n != "boolean")), type(value).__name__)


# ---- input messages ----


def check_input_messages(input_messages: Mapping[str, Any]) -> None:
    """Templates that parse and read only the `item` namespace (nothing is sampled yet). Raises ItemsError."""
    if input_messages["type"] == "item_reference":
        where = "data_source.input_messages.item_reference"
        try:
            reference = parse_reference(input_messages["item_reference"])
        except ValueError as e:
            raise ItemsError(f"Invalid item_reference: {e}.", where) from None
        if reference.namespace != "item":
            raise ItemsError("item_reference names a field of the item: item.<field>.", where)
        return
    for i, message in enumerate(input_messages["template"]):
        where = f"data_source.input_messages.template[{i}].content"
        try:
            template = parse_template(content_text(message["content"]))
        except ValueError as e:
            raise ItemsError(f"Invalid template: {e}.", where) from None
        if any(ref.namespace != "item" for ref in template.references):
            raise ItemsError("An input message reads the item only ({{item.<field>}}): there is no sample before "
                             "the model answers.", where)


def messages(input_messages: Mapping[str, Any], item: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages for one item. Raises LookupError (a field the item lacks: unsloth_core's
    TemplateFieldError) or ValueError (an item_reference that is no list of messages)."""
    namespaces = {"item": dict(item)}
    if input_messages["type"] == "template":
        return [{"role": m["role"], "content": render(content_text(m["content"]), namespaces)}
                for m in input_messages["template"]]
    value = resolve(parse_reference(input_messages["item_reference"]), namespaces)
    if not isinstance(value, list) or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                                              for m in value):
        raise ValueError(f"{input_messages['item_reference']} is not a list of messages with a role and content")
    return [{"role": m["role"], "content": content_text(m.get("content") or "")} for m in value]


def content_text(content: Any) -> str:
    """A message's text: a string, a text part, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, Mapping))
