"""answer_forms.py and ``answer_keys``: the canonical answer forms that votes compare, bounded on hostile input."""

from __future__ import annotations

import pytest

from spiral_lit.tasks import CountdownTask
from spiral_lit.tasks.answer_forms import MAX_MATH_KEY_CHARS, math_key, normalised_text
from spiral_lit.tasks.base import answer_keys


def test_normalised_text_collapses_spacing_but_keeps_lines() -> None:
    assert normalised_text("  a \t b  ") == "a b"
    assert normalised_text("1 2 \n\n 3 4") == "1 2\n3 4"
    assert normalised_text("Yes") != normalised_text("yes")


def test_math_key_prints_exact_and_unambiguous_forms() -> None:
    assert math_key("0.50") == math_key("\\frac{1}{2}") == ("math", "(1/2)")
    assert math_key("1.5^{9}") != math_key("3/2^{9}")  # a power of 3/2 against 3 over a power of 2
    assert math_key("0.5^{99999999999}")[0] == "math"  # printed, never evaluated
    assert math_key("x" * (MAX_MATH_KEY_CHARS + 1)) == ("text", "x" * (MAX_MATH_KEY_CHARS + 1))


def test_answer_keys_key_each_problems_answers_and_keep_none() -> None:
    task = CountdownTask()
    p0, p1 = task.problem(0, "train"), task.problem(1, "train")
    keys = answer_keys(task, [p0, p1], ["(1+5)*5", None, "(1+5)*5", "x"])
    assert keys[:2] == [task.answer_key("(1+5)*5", p0), None]
    assert keys[2:] == [task.answer_key("(1+5)*5", p1), task.answer_key("x", p1)]
    with pytest.raises(ValueError, match="3 answers do not split evenly over 2 problems"):
        answer_keys(task, [p0, p1], ["1", "2", "3"])
