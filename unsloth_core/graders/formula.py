"""A multi grader's `calculate_output`: arithmetic over its sub-graders' scores, never `eval`.

The language is OpenAI's: numbers, the sub-graders' keys as variables, `+ - * /`, `^` for power (`**` also reads),
unary minus and plus, parentheses, and the functions `min`, `max` (one or more arguments), `abs`, `floor`,
`ceil`, `exp`, `sqrt` and `log` (natural; `log(x, base)` too). The text is parsed by Python's `ast` (after `^`
becomes `**`, which gives power its usual precedence: `2 * a ^ 2` is `2 * (a ** 2)`, `-a ^ 2` is `-(a ** 2)`),
and the tree is checked node by node against that list: any other node (a name that is not a sub-grader, an
attribute, a subscript, a string, a comparison, a lambda, keyword arguments) is refused with what it was, when the
grader is validated. Evaluation walks the checked tree in floats: nothing reaches Python's evaluator, and `**`
goes through `math.pow`, so a huge power overflows at once instead of building a huge integer.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

MAX_LENGTH = 4096
MAX_DEPTH = 64  # nesting of operations and calls; a checked tree this shallow cannot exhaust the evaluator's stack

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: math.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}
# name -> (function, least arguments, most arguments or None)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (min, 1, None),
    "max": (max, 1, None),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
}
_OPERATOR_NAMES = {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
                   ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^"}


class FormulaError(ValueError):
    """A formula that cannot be read (at validation) or a value it cannot compute (at grading: log(0), 1/0)."""


@dataclass(frozen=True)
class Formula:
    source: str
    tree: ast.expr
    names: frozenset[str]  # the sub-graders it reads

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value for these sub-grader scores. Raises FormulaError when it is not a finite number."""
        try:
            result = float(_evaluate(self.tree, values))
        except (ArithmeticError, ValueError) as e:  # ZeroDivisionError, OverflowError, math domain errors
            raise FormulaError(f"calculate_output {self.source!r}: {e}") from None
        if not math.isfinite(result):
            raise FormulaError(f"calculate_output {self.source!r} is {result}")
        return result


def parse_formula(source: str, names: Collection[str]) -> Formula:
    """Parse and check `source` against the sub-grader keys `names`. Raises FormulaError saying what is refused."""
    if not source.strip():
        raise FormulaError("calculate_output is empty")
    if len(source) > MAX_LENGTH:
        raise FormulaError(f"calculate_output is {len(source)} characters; at most {MAX_LENGTH}")
    try:
        tree = ast.parse(source.replace("^", "**").strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise FormulaError(f"cannot parse calculate_output {source!r}: {getattr(e, 'msg', e)}") from None
    used: set[str] = set()
    _check(tree, frozenset(names), used, depth=0)
    return Formula(source, tree, frozenset(used))


def _check(node: ast.AST, names: frozenset[str], used: set[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FormulaError(f"calculate_output nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise FormulaError(f"{node.value!r} is not a number: only numbers, sub-grader names and functions")
        try:
            finite = math.isfinite(float(node.value))  # type: ignore[arg-type]  # int or float, checked above
        except OverflowError:
            finite = False
        if not finite:
            raise FormulaError(f"{str(node.value)[:20]}... is not a finite float" if len(str(node.value)) > 20
                               else f"{node.value!r} is not a finite float")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            hint = f" (it is a function: call it, {node.id}(...))" if node.id in FUNCTIONS else ""
            raise FormulaError(f"{node.id!r} is not a sub-grader{hint}; the sub-graders are: {known}")
        used.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise FormulaError(f"operator {_OPERATOR_NAMES.get(type(node.op), type(node.op).__name__)} is not "
                               "allowed: the operators are + - * / ^")
        _check(node.left, names, used, depth + 1)
        _check(node.right, names, used, depth + 1)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise FormulaError(f"unary {type(node.op).__name__} is not allowed: only - and +")
        _check(node.operand, names, used, depth + 1)
    elif isinstance(node, ast.Call):
        _check_call(node, names, used, depth)
    else:
        raise FormulaError(f"{_describe(node)} is not allowed in calculate_output: only numbers, sub-grader names, "
                           "+ - * / ^, parentheses and the functions " + ", ".join(FUNCTIONS))


def _check_call(node: ast.Call, names: frozenset[str], used: set[str], depth: int) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        what = node.func.id if isinstance(node.func, ast.Name) else _describe(node.func)
        raise FormulaError(f"{what!s} is not a function here: the functions are {', '.join(FUNCTIONS)}")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise FormulaError(f"{node.func.id}() takes plain arguments only")
    _, least, most = FUNCTIONS[node.func.id]
    if len(node.args) < least or (most is not None and len(node.args) > most):
        count = f"{least}" if least == most else f"{least} or more" if most is None else f"{least} to {most}"
        raise FormulaError(f"{node.func.id}() takes {count} arguments, not {len(node.args)}")
    for arg in node.args:
        _check(arg, names, used, depth + 1)


def _describe(node: ast.AST) -> str:
    kinds = {ast.Attribute: "attribute access (x.y)", ast.Subscript: "subscripting (x[...])",
             ast.Compare: "a comparison", ast.BoolOp: "and/or", ast.Lambda: "a lambda", ast.IfExp: "if/else",
             ast.Tuple: "a tuple", ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set",
             ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment (:=)"}
    return next((text for kind, text in kinds.items() if isinstance(node, kind)), type(node).__name__)


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    # Only the node kinds _check let through reach here.
    if isinstance(node, ast.Constant):
        return float(node.value)  # type: ignore[arg-type]  # _check let only ints and floats through
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    function = FUNCTIONS[node.func.id][0]
    return float(function(*(_evaluate(arg, values) for arg in node.args)))
