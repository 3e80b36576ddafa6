"""Canonical forms of extracted answers, for :meth:`spiral_lit.tasks.base.Task.answer_key` (docs/algorithm.md §7.2).

Keys are computed in the trainer process on model output, so every form here is bounded and never runs the
answer as code: :func:`normalised_text` only rewrites whitespace; :func:`math_key` hands at most
``MAX_MATH_KEY_CHARS`` characters to math-verify's parser under its own timeout and falls back to the
normalised text whenever that cannot be done safely.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Hashable

# Longer answers are keyed by their text [ours]: math-verify's parse is super-linear in its input, and reference
# answers are short, so two long answers that differ only in form are rare enough to count as two answers.
MAX_MATH_KEY_CHARS = 100
# Seconds math-verify may spend parsing one answer (its signal.alarm takes whole seconds).
MATH_KEY_TIMEOUT_S = 1
# Floats whose binary exponent is beyond this are keyed by text: their exact rational would have huge digits.
_MAX_FLOAT_EXPONENT = 10_000
_WHITESPACE = re.compile(r"\s+")


def normalised_text(answer: str) -> str:
    """``answer`` stripped, each whitespace run made one space, or one newline where it holds a line break
    (so ``1  2`` is ``1 2`` while the rows of a grid stay rows)."""
    return _WHITESPACE.sub(lambda m: "\n" if "\n" in m.group() else " ", answer.strip())


def math_key(answer: str) -> Hashable:
    """``("math", str of math-verify's parse)`` so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` are one answer; else
    ``("text", normalised text)``.

    Falls back to the text when the answer is longer than ``MAX_MATH_KEY_CHARS``, outside the main thread
    (math-verify's timeout uses ``signal.alarm``, which works only there, and an unbounded parse could hang the
    trainer), when the parse times out after ``MATH_KEY_TIMEOUT_S``, finds nothing, or is not a sympy
    expression, or when printing it fails (an integer over Python's 4300-digit limit). Floats become exact
    rationals first (math-verify reads ``0.5`` as ``1/2`` but ``0.50`` as a float).
    """
    text = ("text", normalised_text(answer))
    if len(answer) > MAX_MATH_KEY_CHARS or threading.current_thread() is not threading.main_thread():
        return text
    import sympy
    from math_verify import parse  # imported here: slow, and only math tasks need it

    wrapped = answer if "$" in answer else f"${answer}$"  # math-verify parses LaTeX best between $ signs
    try:
        parsed = parse(wrapped, parsing_timeout=MATH_KEY_TIMEOUT_S)
        if not parsed or not isinstance(parsed[0], sympy.Basic):
            return text
        return ("math", _exact_printer()().doprint(parsed[0]))
    except Exception:  # noqa: BLE001 - any failure on hostile input means: key by text
        return text


@functools.cache
def _exact_printer() -> type:
    """sympy's ``str`` printer with floats written as the exact rationals they spell (``0.50`` as ``1/2``).

    Printing, not rebuilding the expression: a rebuilt ``0.5^{99999999}`` would evaluate ``2**99999999``.
    """
    import sympy
    from sympy.printing.str import StrPrinter

    class ExactPrinter(StrPrinter):
        def _print_Float(self, expr: sympy.Float) -> str:
            if abs(expr._mpf_[2]) > _MAX_FLOAT_EXPONENT:  # 1.5e+999999999 would build a billion-digit integer
                raise ValueError("float exponent too large for an exact key")
            return self._print(sympy.Rational(str(expr)))

        def _print_Rational(self, expr: sympy.Rational) -> str:
            # Parenthesised, so that 1.5^{9} (a power of 3/2) does not print like 3/2^{9}.
            return str(expr.p) if expr.q == 1 else f"({expr.p}/{expr.q})"

    return ExactPrinter
