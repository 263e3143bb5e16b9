"""Validate a whole JSONL training file, line by line, and report every bad line.

The file is streamed: memory stays bounded by the longest allowed line, whatever the file's size. Each bad line gets
one error, its first problem: a 1-based line number, a stable code and a message that says what to change.

| code                   | meaning                                                                        |
|------------------------|--------------------------------------------------------------------------------|
| `empty_file`           | no non-blank line (line is null)                                               |
| `invalid_utf8`         | not UTF-8: bad bytes, a lone surrogate escape, or a UTF-16 file (line null)    |
| `line_too_large`       | a line longer than `max_line_bytes`                                            |
| `invalid_json`         | not one JSON value (one object per line), or nested deeper than 64 levels      |
| `not_an_object`        | JSON, but not an object                                                        |
| `unknown_format`       | keys that match no format                                                      |
| `mixed_formats`        | a format other than the file's (set by its first example)                      |
| `wrong_purpose`        | SFT data for a DPO job or the reverse (on the first example)                   |
| `missing_field`        | a format's key missing                                                         |
| `empty_field`          | a string field that is empty                                                   |
| `invalid_content_type` | content that is not a string (or text parts)                                   |
| `invalid_field_type`   | another field of the wrong type (`tools`)                                      |
| `missing_messages`     | `messages` absent or not a list                                                |
| `empty_messages`       | `messages` is `[]`                                                             |
| `invalid_message`      | a message that is not an object, or has no role                                |
| `unrecognized_role`    | a role outside system/user/assistant/tool (or sharegpt's names)                |
| `missing_content`      | a message without content                                                      |
| `invalid_weight`       | `weight` other than 0 or 1, or on a non-assistant message                      |
| `no_assistant_message` | nothing to learn: no assistant message, or all have weight 0                   |
| `invalid_preference`   | a DPO pair that is malformed (not one assistant reply each, identical replies) |
| `invalid_prompt`       | a reinforcement prompt that ends with an assistant message                     |
| `template_error`       | the model's chat template refuses the conversation (needs a tokenizer)         |
| `too_long`             | truncation to max_seq_length leaves no token to learn from (needs a tokenizer) |

Truncation by itself is not an error: OpenAI and Together truncate too. Truncated examples are counted
(`n_truncated`) so the caller can warn.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from unsloth_core.data.chat import render
from unsloth_core.data.examples import Example, PreferenceExample, RLExample
from unsloth_core.data.formats import Format, Purpose, RowError, detect_format, json_type
from unsloth_core.data.preference import tokenize_preference
from unsloth_core.data.sft import tokenize_sft
from unsloth_core.errors import DataFormatError
from unsloth_core.tokenizer import Tokenizer

MAX_ERRORS = 1000  # errors kept in a report; all are counted
MAX_LINE_BYTES = 16 * 1024 * 1024  # a line longer than this is an error, never read into memory whole
MAX_DEPTH = 64  # JSON nesting: a chat example needs about 5 levels (tools' schemas a few more)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True)
class LineError:
    """One bad line. `line` is 1-based; None for a problem with the whole file."""

    line: int | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where}: {self.code}: {self.message}"


@dataclass
class ValidationReport:
    """What `validate_file` found. JSON-ready through `to_dict()`; `ok` when there is no error at all.

    Token counts are None unless a tokenizer was given. `n_examples` counts the lines that parsed into examples;
    `n_loss_tokens` the tokens that get loss (the trained tokens per epoch, with default prompt masking).
    """

    format: str | None = None
    purpose: Purpose | None = None
    n_lines: int = 0
    n_examples: int = 0
    n_tokens: int | None = None
    n_loss_tokens: int | None = None
    n_truncated: int | None = None
    max_seq_length: int | None = None
    n_errors: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)
    max_errors: int = MAX_ERRORS

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def add(self, line: int | None, code: str, message: str) -> None:
        self.n_errors += 1
        self.error_counts[code] = self.error_counts.get(code, 0) + 1
        if len(self.errors) < self.max_errors:
            self.errors.append(LineError(line, code, message))

    def summary(self, limit: int = 3, role: str = "training") -> str:
        """One paragraph for a job's error message: the count and the first few errors."""
        if self.ok:
            return f"{self.n_examples} valid {self.format} examples"
        shown = "; ".join(str(e) for e in self.errors[:limit])
        more = f" (and {self.n_errors - limit} more)" if self.n_errors > limit else ""
        return f"{self.n_errors} invalid line(s) in the {role} file: {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "format": self.format, "purpose": self.purpose, "n_lines": self.n_lines,
            "n_examples": self.n_examples, "n_tokens": self.n_tokens, "n_loss_tokens": self.n_loss_tokens,
            "n_truncated": self.n_truncated, "max_seq_length": self.max_seq_length, "n_errors": self.n_errors,
            "error_counts": dict(self.error_counts), "errors_truncated": self.n_errors > len(self.errors),
            "errors": [{"line": e.line, "code": e.code, "message": e.message} for e in self.errors],
        }


class DataFileError(DataFormatError):
    """A data file with errors; `report` holds all of them, `errors` the stored ones, `role` which file it is
    ("training" or "validation"), so a caller can point at the right one."""

    def __init__(self, report: ValidationReport, role: str = "training") -> None:
        super().__init__(report.summary(role=role))
        self.report, self.role = report, role
        self.errors = report.errors


Source = str | os.PathLike[str] | IO[bytes]


def validate_file(source: Source, tokenizer: Tokenizer | None = None, max_seq_length: int | None = None,
                  purpose: Purpose | None = None, *, max_errors: int = MAX_ERRORS,
                  max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Read the whole file and report every bad line (see the module's table of codes).

    Args:
        source: a path, or a binary file object positioned at the start.
        tokenizer: when given, examples are rendered and tokenized as for training: token counts, truncation and the
            chat template's own checks are included.
        max_seq_length: the training sequence length, for `n_truncated` and `too_long` (needs `tokenizer`).
        purpose: "sft", "dpo" or "rl" refuses the other kinds of data (`wrong_purpose`); None accepts any. For "rl",
            every `messages` or `prompt` row is read as a prompt (see `formats.detect_format`).
    """
    return _scan(source, tokenizer, max_seq_length, purpose, max_errors, max_line_bytes, keep=None)


def load_examples(source: Source, purpose: Purpose | None = None, tokenizer: Tokenizer | None = None,
                  max_seq_length: int | None = None, role: str = "training") -> list[Example]:
    """Every example in the file, normalised. Raises DataFileError (a DataFormatError carrying the report) when any
    line is bad: nothing trains on a file with errors."""
    examples: list[Example] = []
    report = _scan(source, tokenizer, max_seq_length, purpose, MAX_ERRORS, MAX_LINE_BYTES, keep=examples)
    if not report.ok:
        raise DataFileError(report, role)
    return examples


def _scan(source: Source, tokenizer: Tokenizer | None, max_seq_length: int | None, purpose: Purpose | None,
          max_errors: int, max_line_bytes: int, keep: list[Example] | None) -> ValidationReport:
    if purpose not in (None, "sft", "dpo", "rl"):
        raise ValueError(f"purpose must be 'sft', 'dpo', 'rl' or None, got {purpose!r}")
    report = ValidationReport(max_seq_length=max_seq_length, max_errors=max_errors)
    checker = _LineChecker(tokenizer, max_seq_length, purpose, report)
    with _open(source) as f:
        for number, raw in _read_lines(f, max_line_bytes, report):
            try:
                example = checker.check(number, raw)
            except RowError as e:
                report.add(number, e.code, e.message)
                continue
            if example is not None and keep is not None:
                keep.append(example)
    if report.n_lines == 0 and report.ok:
        report.add(None, "empty_file", "the file has no examples (it is empty or holds only blank lines)")
    return report


class _LineChecker:
    """Checks one line at a time; remembers the file's format (set by its first example) and keeps the counts."""

    def __init__(self, tokenizer: Tokenizer | None, max_seq_length: int | None, purpose: Purpose | None,
                 report: ValidationReport) -> None:
        self.tokenizer, self.max_seq_length, self.purpose, self.report = tokenizer, max_seq_length, purpose, report
        self.first: tuple[Format, int] | None = None  # the file's format and the line that set it
        if tokenizer is not None:
            report.n_tokens = report.n_loss_tokens = report.n_truncated = 0

    def check(self, number: int, raw: bytes) -> Example | None:
        """The line's example (None for a blank line); raises RowError."""
        if not raw.removeprefix(codecs.BOM_UTF8).strip():
            return None  # blank lines (CRLF ones too) are allowed and skipped
        self.report.n_lines += 1
        row = _decode(raw)
        if not isinstance(row, dict):
            raise RowError("not_an_object", f"each line must be a JSON object, got {json_type(row)}")
        fmt = self._format(row)
        if self.first is None:
            self.first = (fmt, number)
            self.report.format, self.report.purpose = fmt.name, fmt.purpose
            _check_purpose(fmt, self.purpose)
        elif fmt is not self.first[0]:
            raise RowError("mixed_formats", f"this line is {fmt.name}, but the file is {self.first[0].name} (from "
                                            f"line {self.first[1]}); a file holds one format")
        example = fmt.parse(row)
        if self.tokenizer is not None:
            self._measure(example, self.tokenizer)
        self.report.n_examples += 1
        return example

    def _format(self, row: dict[str, Any]) -> Format:
        """The file's format where the row has its keys (a chat file's line without an assistant turn is that
        chat line's error, not an RL prompt), else the row's own."""
        if self.first is not None and all(k in row for k in self.first[0].required):
            return self.first[0]
        return detect_format(row, self.purpose)

    def _measure(self, example: Example, tokenizer: Tokenizer) -> None:
        """Tokenize as the trainer will, and count; a conversation the template refuses is this line's error."""
        try:
            if isinstance(example, RLExample):
                self._measure_prompt(example, tokenizer)
                return
            if isinstance(example, PreferenceExample):
                pair = tokenize_preference(example, tokenizer, self.max_seq_length)
                replies: tuple[int, ...] = (len(pair.chosen_ids), len(pair.rejected_ids))
                n_tokens, truncated = 2 * len(pair.prompt_ids) + sum(replies), pair.truncated
            else:
                tokenized = tokenize_sft(example, tokenizer, self.max_seq_length)
                replies = (tokenized.n_loss_tokens,)
                n_tokens, truncated = len(tokenized), tokenized.truncated
        except DataFormatError as e:
            raise RowError("template_error", str(e)) from None
        if truncated and min(replies) == 0:
            raise RowError("too_long", f"longer than max_seq_length={self.max_seq_length} tokens, and truncating it "
                                       "leaves no reply tokens to learn from; shorten the prompt or raise "
                                       "max_seq_length")
        report = self.report
        assert report.n_tokens is not None and report.n_loss_tokens is not None and report.n_truncated is not None
        report.n_tokens += n_tokens
        report.n_loss_tokens += sum(replies)
        report.n_truncated += int(truncated)

    def _measure_prompt(self, example: RLExample, tokenizer: Tokenizer) -> None:
        """A prompt's tokens as GRPO renders it (the chat template's generation prompt); one longer than
        max_seq_length is counted as truncated (GRPO keeps its end). No loss tokens: the completions are sampled."""
        if isinstance(example.prompt, str):
            n_tokens = len(tokenizer.encode(example.prompt))
        else:
            try:
                text = render(tokenizer, example.prompt, example.tools, add_generation_prompt=True)
                n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            except DataFormatError as e:
                raise RowError("template_error", str(e)) from None
            except Exception as e:  # the template's own raise_exception, or a message it cannot render
                raise RowError("template_error", f"the chat template cannot render this prompt: {e}") from None
        report = self.report
        assert report.n_tokens is not None and report.n_truncated is not None
        report.n_tokens += n_tokens
        report.n_truncated += int(self.max_seq_length is not None and n_tokens > self.max_seq_length)


# ---- reading ----

@contextmanager
def _open(source: Source) -> Iterator[IO[bytes]]:
    """A path opened for binary reading, or a file object the caller owns (left open)."""
    if isinstance(source, str | os.PathLike):
        with Path(source).open("rb") as f:
            yield f
    else:
        yield source


def _read_lines(f: IO[bytes], max_line_bytes: int, report: ValidationReport) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) per line. Lines over the limit are reported and skipped without being held."""
    number = 0
    while line := f.readline(max_line_bytes + 1):
        number += 1
        if number == 1 and line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            report.add(None, "invalid_utf8", "the file is UTF-16; save it as UTF-8 (one JSON object per line)")
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            report.n_lines += 1
            report.add(number, "line_too_large", f"the line is longer than {max_line_bytes} bytes")
            continue
        yield number, line


def _decode(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", f"byte {e.start + 1} of the line (0x{raw[e.start]:02x}) is not valid UTF-8; "
                                       "save the file as UTF-8") from None
    # A byte-order mark is harmless; it also appears mid-file where files were concatenated.
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", f"not valid JSON (column {e.colno}: {e.msg}); each line must be one complete "
                                       "JSON object") from None
    except RecursionError:
        raise RowError("invalid_json", f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise RowError("invalid_json", f"not valid JSON: {e}") from None
    if isinstance(value, dict | list):
        _check_shape(value, check_surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _check_shape(value: Any, check_surrogates: bool) -> None:
    """Refuse what no training example needs and later steps cannot take: nesting deeper than MAX_DEPTH (the checks,
    comparisons and chat templates after this recurse), and strings with an unpaired UTF-16 surrogate escape
    (`"\\ud800"`: not Unicode text; no tokenizer encodes it). Iterative, so any depth is safe here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                half = f"\\u{ord(item[e.start]):04x}"
                raise RowError("invalid_utf8", f"a string holds {half}, half of a UTF-16 surrogate pair, without its "
                                               "other half; that is not Unicode text") from None
            continue
        if depth > MAX_DEPTH:
            raise RowError("invalid_json", f"nested more than {MAX_DEPTH} levels deep")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children
                     if isinstance(c, dict | list) or (check_surrogates and isinstance(c, str)))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (use null or a number)")


def _check_purpose(fmt: Format, purpose: Purpose | None) -> None:
    if purpose is not None and fmt.purpose != purpose:
        sft = "supervised examples (messages, prompt/completion, text, alpaca or sharegpt)"
        dpo = "preference pairs (input/preferred_output/non_preferred_output or prompt/chosen/rejected)"
        rl = "prompts (messages ending with the turn the model answers, or prompt), with the fields the grader reads"
        wanted = {"dpo": dpo, "rl": rl}.get(purpose, sft)
        raise RowError("wrong_purpose", f"the file is {fmt.name} data, for {fmt.purpose.upper()}; a {purpose.upper()} "
                                        f"job needs {wanted}")
