"""A reader of the subset of Go's text/template that unsloth_core/ollama.py writes, to render an Ollama TEMPLATE in
a test (Ollama and Go are not installed here): literal text, `{{ if P }}` / `{{ else if P }}` / `{{ end }}`,
`{{ range $i, $_ := .Messages }}`, `{{ $x := P }}`, fields (`.Role`, `$.Messages`), string literals, and the
functions eq, ne, and, len, slice, with Go's semantics for them (`and` of booleans, `slice x i` = x[i:])."""

from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"{{(.*?)}}", re.S)
TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def render(template: str, data: dict[str, Any]) -> str:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in ACTION.finditer(template):
        parts.append(("text", template[pos:m.start()]))
        parts.append(("action", m.group(1).strip()))
        pos = m.end()
    parts.append(("text", template[pos:]))
    out: list[str] = []
    _run(parts, 0, len(parts), {"$": data, ".": data}, out)
    return "".join(out)


def _block_end(parts: list[tuple[str, str]], i: int) -> tuple[list[int], int]:
    """Indices of this block's `else` branches and of its `end`, from the part after the opening action."""
    depth, elses = 0, []
    while i < len(parts):
        kind, text = parts[i]
        if kind == "action":
            if text.startswith(("if ", "range ")):
                depth += 1
            elif text == "end":
                if depth == 0:
                    return elses, i
                depth -= 1
            elif text.startswith("else") and depth == 0:
                elses.append(i)
        i += 1
    raise ValueError("unclosed block")


def _run(parts: list[tuple[str, str]], i: int, stop: int, env: dict[str, Any], out: list[str]) -> None:
    while i < stop:
        kind, text = parts[i]
        if kind == "text":
            out.append(text)
        elif text.startswith("if "):
            elses, end = _block_end(parts, i + 1)
            branches = [(text[3:], i + 1)] + [(parts[e][1][len("else if "):] if parts[e][1] != "else" else "true",
                                               e + 1) for e in elses]
            bounds = [*elses, end]
            for (cond, start), last in zip(branches, bounds):
                if cond == "true" or _truth(_eval(cond, env)):
                    _run(parts, start, last, env, out)
                    break
            i = end
        elif text.startswith("range "):
            names, expr = text[6:].split(":=")
            index_name, value_name = [n.strip() for n in names.split(",")]
            _, end = _block_end(parts, i + 1)
            for k, item in enumerate(_eval(expr, env)):
                _run(parts, i + 1, end, {**env, index_name: k, value_name: item, ".": item}, out)
            i = end
        elif re.match(r"\$\w+ :=", text):
            name, expr = text.split(":=", 1)
            env[name.strip()] = _eval(expr, env)
        else:
            out.append(str(_eval(text, env)))
        i += 1


def _truth(v: Any) -> bool:
    return bool(v)


def _eval(expr: str, env: dict[str, Any]) -> Any:
    tokens = TOKEN.findall(expr)
    value, rest = _call(tokens, env)
    assert not rest, expr
    return value


def _call(tokens: list[str], env: dict[str, Any]) -> tuple[Any, list[str]]:
    args, rest = [], tokens
    while rest and rest[0] != ")":
        value, rest = _operand(rest, env)
        args.append(value)
    if callable(args[0]):
        return args[0](*args[1:]), rest
    assert len(args) == 1
    return args[0], rest


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: next((x for x in a if not x), a[-1]),
         "len": len, "slice": lambda x, i: x[i:]}


def _operand(tokens: list[str], env: dict[str, Any]) -> tuple[Any, list[str]]:
    tok, rest = tokens[0], tokens[1:]
    if tok == "(":
        value, rest = _call(rest, env)
        return value, rest[1:]
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape"), rest
    if tok.isdigit():
        return int(tok), rest
    if tok in FUNCS:
        return FUNCS[tok], rest
    if tok.startswith("$."):
        return env["$"][tok[2:]], rest
    if tok.startswith("$"):
        return env[tok], rest
    if tok.startswith("."):
        return env["."][tok[1:]], rest
    raise ValueError(f"unsupported token {tok!r}")
