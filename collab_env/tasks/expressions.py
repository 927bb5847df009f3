"""A safe evaluator of arithmetic expressions (Countdown answers). Never uses `eval`.

Only integer literals, + - * /, unary minus and parentheses are accepted; the text is checked
character by character before it is parsed, its length and node count are bounded, and values
are exact fractions. Anything else (names, calls, attributes, `**`) is rejected, so an answer
such as `__import__('os')` or `9**9**9` is a wrong answer, not code and not a hang.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_LENGTH = 200
MAX_NODES = 100
MAX_LITERAL = 10**6

_ALLOWED_TEXT = re.compile(r"^[0-9+\-*/().\s]*$")
_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class UnsafeExpression(ValueError):
    """The text is not a plain arithmetic expression."""


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value of `text` and the integer literals it uses, in order.

    Raises `UnsafeExpression` for anything but integers, + - * /, unary minus and parentheses,
    and `ZeroDivisionError` for a division by zero.
    """
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if len(text) > MAX_LENGTH:
        raise UnsafeExpression(f"expression longer than {MAX_LENGTH} characters")
    if not text or not _ALLOWED_TEXT.match(text) or "**" in text or "//" in text:
        raise UnsafeExpression(f"not a plain arithmetic expression: {text[:40]!r}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise UnsafeExpression(f"cannot parse {text[:40]!r}") from err
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise UnsafeExpression(f"expression has more than {MAX_NODES} parts")
    numbers: list[int] = []
    return _value(tree.body, numbers), numbers


def _value(node: ast.AST, numbers: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value > MAX_LITERAL:
            raise UnsafeExpression(f"number {node.value} is too large")
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _value(node.operand, numbers)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, numbers), _value(node.right, numbers)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right
    raise UnsafeExpression(f"operation {type(node).__name__} is not allowed")


def check_countdown(text: str | None, numbers: list[int], target: int, use_all: bool = True) -> bool:
    """True when `text` reaches `target` using the given numbers (each at most once; all of them if `use_all`)."""
    if not text:
        return False
    expression = text.split("=")[0]
    try:
        value, used = evaluate(expression)
    except (UnsafeExpression, ZeroDivisionError):
        return False
    available = sorted(numbers)
    if use_all and sorted(used) != available:
        return False
    remaining = list(available)
    for n in used:
        if n not in remaining:
            return False
        remaining.remove(n)
    return value == target


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression that reaches `target` using every number once, or None (exhaustive; fine up to 6 numbers)."""
    goal = Fraction(target)

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == goal else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ta), (b, tb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                candidates = [(a + b, f"({ta} + {tb})"), (a - b, f"({ta} - {tb})"), (a * b, f"({ta} * {tb})")]
                if b != 0:
                    candidates.append((a / b, f"({ta} / {tb})"))
                for value, text in candidates:
                    found = search([*rest, (value, text)])
                    if found:
                        return found
        return None

    if not numbers or len(numbers) > 6:
        return None
    return search([(Fraction(n), str(n)) for n in numbers])
