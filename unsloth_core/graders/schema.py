"""OpenAI's grader objects, parsed and checked: `validate_grader(obj)` turns the JSON into one of the classes below.

The shapes are those of OpenAI's API reference (`openai.types.graders`), plus the fields its graders guide shows
(`pass_threshold` on text_similarity and score_model). Unknown fields are refused, so a misspelt one is an error
instead of being ignored. `name` may be left out (OpenAI's guide does); it then reads as the grader's type.

Everything that can be checked without a sample is checked here: templates (`{{item.x}}`), a multi grader's
formula against its sub-graders' keys, a python grader's source (it compiles and defines `grade`), a score range,
labels. A failure raises `GraderValidationError` whose paths run from the grader's root:
`graders.accuracy.operation: must be one of 'eq', 'ne', 'like', 'ilike'`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from unsloth_core.graders.errors import GraderValidationError
from unsloth_core.graders.formula import Formula, FormulaError, parse_formula
from unsloth_core.graders.template import parse_template

MAX_PYTHON_SOURCE_BYTES = 256 * 1024  # OpenAI's limit
Metric = Literal["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                 "rouge_l", "cosine"]
Role = Literal["user", "assistant", "system", "developer"]


def _check_template(value: str) -> str:
    parse_template(value)  # raises ValueError with what is wrong
    return value


TemplateStr = Annotated[str, AfterValidator(_check_template)]


def _template_problem(value: str) -> str | None:
    try:
        parse_template(value)
    except ValueError as e:
        return str(e)
    return None


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""

    @property
    def label(self) -> str:
        """The name a result carries: `name`, or the type when none was given."""
        return self.name or str(getattr(self, "type", ""))

    def strings(self) -> Iterator[str]:
        """Every template string of this grader (a multi grader: of its sub-graders)."""
        return iter(())

    def to_openai(self) -> dict[str, Any]:
        """The grader as OpenAI's JSON (what graders/validate echoes)."""
        return self.model_dump(mode="json", exclude_none=True)


class StringCheckGrader(_Grader):
    """1 when `input` and `reference` pass `operation`, else 0: `eq` equal, `ne` different, `like` input contains
    reference, `ilike` the same ignoring case (OpenAI's definitions: a containment test, not SQL's patterns)."""

    type: Literal["string_check"]
    input: TemplateStr
    reference: TemplateStr
    operation: Literal["eq", "ne", "like", "ilike"]

    def strings(self) -> Iterator[str]:
        yield from (self.input, self.reference)


class TextSimilarityGrader(_Grader):
    """`evaluation_metric` of `input` against `reference`; passes at `pass_threshold` when one is given."""

    type: Literal["text_similarity"]
    input: TemplateStr
    reference: TemplateStr
    evaluation_metric: Metric
    pass_threshold: float | None = None

    def strings(self) -> Iterator[str]:
        yield from (self.input, self.reference)


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["input_text", "output_text"]
    text: TemplateStr


class Message(BaseModel):
    """A judge prompt's message. `content`: a string, a text part (`input_text`/`output_text`), or a list of them.
    Images and audio are refused: the judges this server runs are text models."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str | InputText | list[str | InputText]
    type: Literal["message"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        # Checked here, part by part, so that an error says which part and why (a union's errors would list
        # every member's complaint).
        parts = value if isinstance(value, list) else [value]
        for i, part in enumerate(parts):
            where = f"part {i}: " if isinstance(value, list) else ""
            if isinstance(part, str):
                problem = _template_problem(part)
            elif isinstance(part, Mapping) and part.get("type") in ("input_image", "input_audio"):
                problem = f"{part['type']} is not supported: the judges served here read text only"
            elif isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text"):
                text = part.get("text")
                problem = _template_problem(text) if isinstance(text, str) else "a text part needs a string 'text'"
                extra = set(part) - {"type", "text"}
                problem = problem or (f"unknown fields {sorted(extra)}" if extra else None)
            else:
                problem = "content is a string, an input_text/output_text part, or a list of them"
            if problem:
                raise ValueError(where + problem)
        return value

    def texts(self) -> list[str]:
        """The content's template strings, in order."""
        parts = self.content if isinstance(self.content, list) else [self.content]
        return [part if isinstance(part, str) else part.text for part in parts]


class SamplingParams(BaseModel):
    """The judge's sampling parameters, as OpenAI names them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_completions_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    seed: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)


class _ModelGrader(_Grader):
    input: list[Message] = Field(min_length=1)
    model: str = Field(min_length=1)
    sampling_params: SamplingParams | None = None

    def strings(self) -> Iterator[str]:
        for message in self.input:
            yield from message.texts()


class ScoreModelGrader(_ModelGrader):
    """A judge model's number, clamped to `range` (default [0, 1]); passes at `pass_threshold` when given."""

    type: Literal["score_model"]
    range: list[float] | None = None
    pass_threshold: float | None = None

    @field_validator("range")
    @classmethod
    def _range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not all(map(math.isfinite, value)) or value[0] >= value[1]):
            raise ValueError(f"range must be two finite numbers [low, high] with low < high; got {value}")
        return value

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.range or (0.0, 1.0)
        return float(low), float(high)


class LabelModelGrader(_ModelGrader):
    """A judge model picks one of `labels`; 1 when it is one of `passing_labels`, else 0."""

    type: Literal["label_model"]
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not all(label.strip() for label in value):
            raise ValueError("labels must be distinct, non-empty strings")
        return value

    @field_validator("passing_labels")
    @classmethod
    def _passing(cls, value: list[str], info: ValidationInfo) -> list[str]:
        stray = [label for label in value if label not in info.data.get("labels", value)]
        if stray:
            raise ValueError(f"passing_labels must be among labels; {stray} are not")
        return value


class PythonGrader(_Grader):
    """The user's `grade(sample, item) -> float`, run in a locked-down process (see `python_grader`)."""

    type: Literal["python"]
    source: str
    image_tag: str | None = None  # OpenAI's runtime image; accepted and ignored (our sandbox has one runtime)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_PYTHON_SOURCE_BYTES:
            raise ValueError(f"source is {size} bytes; at most {MAX_PYTHON_SOURCE_BYTES}")
        try:  # parsing runs nothing of the user's code
            tree = ast.parse(value, filename="<grader>")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            raise ValueError(f"source does not compile{where}: {getattr(e, 'msg', e)}") from None
        if not _defines(tree, "grade"):
            raise ValueError("source must define grade(sample, item) -> float at its top level")
        return value


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            params = node.args
            return len(params.posonlyargs) + len(params.args) >= 2 or params.vararg is not None
        if isinstance(node, ast.Assign | ast.AnnAssign) and any(
            isinstance(t, ast.Name) and t.id == name for t in (node.targets if isinstance(node, ast.Assign)
                                                               else [node.target])):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


SubGrader = StringCheckGrader | TextSimilarityGrader | ScoreModelGrader | LabelModelGrader | PythonGrader


class MultiGrader(_Grader):
    """Sub-graders by key, combined by `calculate_output` (see `formula`). Sub-graders cannot be multi graders."""

    type: Literal["multi"]
    graders: dict[str, SubGrader] = Field(min_length=1)
    calculate_output: str

    @property
    def formula(self) -> Formula:
        return _formula(self.calculate_output, frozenset(self.graders))

    def strings(self) -> Iterator[str]:
        for grader in self.graders.values():
            yield from grader.strings()

    def to_openai(self) -> dict[str, Any]:
        out = super().to_openai()
        out["graders"] = {key: grader.to_openai() for key, grader in self.graders.items()}
        return out


Grader = SubGrader | MultiGrader
_CLASSES: dict[str, type[_Grader]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
    "score_model": ScoreModelGrader,
    "label_model": LabelModelGrader,
    "python": PythonGrader,
    "multi": MultiGrader,
}


@lru_cache(maxsize=256)
def _formula(source: str, names: frozenset[str]) -> Formula:
    return parse_formula(source, names)


def validate_grader(obj: Grader | Mapping[str, Any]) -> Grader:
    """Parse OpenAI's grader JSON (or pass a parsed grader through). Raises GraderValidationError."""
    if isinstance(obj, _Grader):
        return obj
    return _validate(obj, path="", nested=False)


def _validate(obj: Any, path: str, nested: bool) -> Grader:
    if not isinstance(obj, Mapping):
        raise GraderValidationError([(path, f"a grader is a JSON object, not {type(obj).__name__}")])
    kind = obj.get("type")
    if nested and kind == "multi":
        raise GraderValidationError([(_join(path, "type"), "a multi grader cannot hold another multi grader")])
    if not isinstance(kind, str) or kind not in _CLASSES:  # a list or object `type` is unhashable: no lookup
        kinds = ", ".join(_CLASSES if not nested else [k for k in _CLASSES if k != "multi"])
        raise GraderValidationError([(_join(path, "type"), f"must be one of {kinds}; got {kind!r}")])
    if kind != "multi":
        return _model(_CLASSES[kind], obj, path)  # type: ignore[return-value]
    subgraders = obj.get("graders")
    if not isinstance(subgraders, Mapping) or not subgraders:
        raise GraderValidationError([(_join(path, "graders"), "must be an object of sub-graders by name")])
    problems: list[tuple[str, str]] = []
    parsed: dict[str, SubGrader] = {}
    for key, sub in subgraders.items():
        where = _join(path, f"graders.{key}")
        if not isinstance(key, str) or not key.isidentifier() or key in ("min", "max", "abs", "floor", "ceil",
                                                                          "exp", "sqrt", "log"):
            problems.append((where, "a sub-grader's key is a name calculate_output reads: letters, digits and _, "
                                    "not starting with a digit, and not a function's name"))
            continue
        try:
            parsed[key] = _validate(sub, where, nested=True)  # type: ignore[assignment]  # nested: never multi
        except GraderValidationError as e:
            problems.extend(e.problems)
    if problems:
        raise GraderValidationError(problems)
    multi = _model(MultiGrader, {**obj, "graders": parsed}, path)
    assert isinstance(multi, MultiGrader)
    try:
        multi.formula  # noqa: B018  # parsed and checked now, cached for grading
    except FormulaError as e:
        raise GraderValidationError([(_join(path, "calculate_output"), str(e))]) from None
    return multi


def _model(cls: type[_Grader], obj: Mapping[str, Any], path: str) -> _Grader:
    try:
        return cls.model_validate(dict(obj))
    except ValidationError as e:
        raise GraderValidationError([_problem(path, error, cls) for error in e.errors()]) from None


def _problem(path: str, error: Any, cls: type[_Grader]) -> tuple[str, str]:
    loc = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in error["loc"]).lstrip(".")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
        if len(error["loc"]) == 1:
            kind = next(k for k, c in _CLASSES.items() if c is cls)
            message += f"; the fields of a {kind} grader are: {', '.join(cls.model_fields)}"
        elif error["loc"][0] == "sampling_params":
            message += f"; sampling_params has {', '.join(SamplingParams.model_fields)}"
    elif error["type"] == "missing":
        message = "required"
    return _join(path, loc), message


def _join(path: str, rest: str) -> str:
    return f"{path}.{rest}" if path and rest else path or rest
