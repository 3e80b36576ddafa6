"""Strict answer grammars for reasoning-gym scorers that evaluate the answer as Python.

In RL the policy writes the answers, so an answer is hostile input. Nine reasoning-gym scorers
(version 0.1.25) hand it to ``eval`` or ``sympy.parse_expr`` (which calls ``eval``):
``binary_matrix``, ``n_queens``, ``spiral_matrix`` and ``string_insertion`` ``eval`` it to accept a
Python-list form; ``countdown``, ``puzzle24``, ``polynomial_multiplication``, ``simple_integration``
and ``intermediate_integration`` parse it with sympy. An answer such as
``__import__('os').system(...)`` would run in the scorer. Before such a scorer sees an answer, it
must match the grammar of that task's answers; anything else scores 0 and is counted as rejected
(:class:`~spiral_lit.tasks.base.UnsafeAnswer`).

Each grammar is a whole-string tokenisation: every token is a number, an operator, a bracket or a
name from an allow-list (the task's variables, a few maths functions). None admits attribute
access, strings with escapes, keywords or underscores-with-letters, so no grammar-conforming answer
can call anything but allow-listed maths functions. Tasks whose grammar allows no parentheses
(the list forms) cannot call anything at all.

``tests/tasks/test_answer_guard.py`` feeds code payloads to every registered reasoning-gym task
and fails if a new release adds an evaluating scorer that is not listed here. The verifier
worker sandbox (:mod:`spiral_lit.tasks.sandbox`) is a second, independent layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_MAX_CHARS = 2000
"""No legitimate answer of these tasks comes close; longer ones are refused before any parsing."""

# Tokens of the sympy-parsed grammars: numbers (no exponent letters), names, operators, brackets.
_EXPRESSION_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z]+)|(\*\*|[-+*/^(),]))")

_CALCULUS_NAMES = frozenset(
    {
        "C", "E", "pi", "I", "oo", "sqrt", "exp", "log", "ln", "Abs", "abs",
        "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "asec", "acsc",
        "sinh", "cosh", "tanh", "coth", "sech", "csch", "asinh", "acosh", "atanh", "acoth",
    }
)  # fmt: skip
"""Names an antiderivative may use besides its variable: the constant C and elementary functions."""


def _expression_names(text: str) -> list[str] | None:
    """The names of ``text`` if the whole string tokenises as a maths expression, else None."""
    names: list[str] = []
    position = 0
    while position < len(text):
        match = _EXPRESSION_TOKEN.match(text, position)
        if match is None or match.end() == position:
            return None if text[position:].strip() else names
        if match.group(2) is not None:
            names.append(match.group(2))
        position = match.end()
    return names


def _arithmetic(text: str, entry: Mapping[str, Any]) -> bool:
    """Integers combined with ``+ - * /`` and brackets (countdown, puzzle24): no names, no powers."""
    return _expression_names(text) == [] and "**" not in text and "^" not in text and "," not in text


def _polynomial(text: str, entry: Mapping[str, Any]) -> bool:
    """A polynomial in the problem's variables (polynomial_multiplication)."""
    names = _expression_names(text)
    variables = set(entry.get("metadata", {}).get("variables", ()))
    return names is not None and set(names) <= variables and "," not in text


def _antiderivative(text: str, entry: Mapping[str, Any]) -> bool:
    """An expression in the problem's variable, ``C`` and elementary functions (the integration tasks)."""
    names = _expression_names(text)
    variable = entry.get("metadata", {}).get("variable")
    return names is not None and set(names) <= _CALCULUS_NAMES | {variable} and "," not in text


def _characters(allowed: str) -> Callable[[str, Mapping[str, Any]], bool]:
    """Answers made only of ``allowed`` characters (a regex class body): the plain and Python-list forms."""
    pattern = re.compile(f"[{allowed}]*")
    return lambda text, entry: pattern.fullmatch(text) is not None


# No parentheses, dots or braces in any of these: an ``eval`` of such a string can build literals and
# look up names, but never call anything.
GRAMMARS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "countdown": _arithmetic,
    "puzzle24": _arithmetic,
    "polynomial_multiplication": _polynomial,
    "simple_integration": _antiderivative,
    "intermediate_integration": _antiderivative,
    "binary_matrix": _characters(r"0-9\s\[\],"),
    "spiral_matrix": _characters(r"0-9\s\[\],\-"),
    "string_insertion": _characters(r"A-Za-z\s\[\],'\""),
    "n_queens": _characters(r"_Q\s\[\],'\""),
}
"""reasoning-gym task name -> does an answer conform to the task's answer grammar."""


def conforms(task_name: str, answer: str, entry: Mapping[str, Any]) -> bool:
    """Whether ``answer`` may be shown to ``task_name``'s scorer (always True for non-evaluating scorers)."""
    grammar = GRAMMARS.get(task_name)
    if grammar is None:
        return True
    return len(answer) <= _MAX_CHARS and grammar(answer, entry)
