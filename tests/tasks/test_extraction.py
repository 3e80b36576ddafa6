"""Answer extraction: hand-written cases, then fuzzing for crashes and super-linear time."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spiral_lit.tasks.extraction import answer_instruction, extract_answer, format_answer


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so <answer>42</answer>", "42"),
        ("<answer> 42 \n</answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer> junk </answer>", "1"),
        ("<answer><answer>7</answer>", "7"),
        ("<answer>truncated", None),
        ("</answer>", None),
        ("<answer>   </answer>", None),
        ("no answer at all", None),
        ("", None),
        ("\\boxed{42}", None),
    ],
)
def test_answer_tag(response: str, expected: str | None) -> None:
    assert extract_answer(response, "answer_tag") == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("\\boxed{1} and a truncated \\boxed{2", "1"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a \\} b}", "a \\} b"),
        ("\\boxed{ }", None),
        ("\\boxed{", None),
        ("\\boxed", None),
        ("}}}\\boxed{3}{{{", "3"),
        ("<answer>42</answer>", None),
    ],
)
def test_boxed(response: str, expected: str | None) -> None:
    assert extract_answer(response, "boxed") == expected


@pytest.mark.parametrize("fmt", ["answer_tag", "boxed"])
@pytest.mark.parametrize("answer", ["42", "-7", "\\frac{1}{2}", "x = 3"])
def test_format_round_trips(fmt: str, answer: str) -> None:
    assert extract_answer(f"work...\n{format_answer(answer, fmt)}", fmt) == answer  # type: ignore[arg-type]


def test_instruction_is_short_and_shows_the_format() -> None:
    assert answer_instruction("answer_tag") == "Give the final answer as <answer>...</answer>."
    assert "\\boxed{...}" in answer_instruction("boxed")
    assert len(answer_instruction("boxed")) < 60


def test_unknown_format_names_it() -> None:
    with pytest.raises(ValueError, match="'latex'"):
        extract_answer("x", "latex")  # type: ignore[arg-type]


_ADVERSARIAL = [
    "\\boxed{" * 5000,
    "\\boxed{" * 5000 + "1" + "}" * 5000,
    "{" * 100_000,
    "}" * 100_000,
    "\\" * 100_001,
    "<answer>" * 20_000,
    "</answer>" * 20_000,
    "<answer>" + "9" * 100_000 + "</answer>",
    "\\boxed{" + "9" * 100_000 + "}",
    ("\\boxed{x}" + "{" * 10) * 5000,
]


@pytest.mark.parametrize("text", _ADVERSARIAL, ids=range(len(_ADVERSARIAL)))
@pytest.mark.parametrize("fmt", ["answer_tag", "boxed"])
def test_adversarial_inputs_are_fast(text: str, fmt: str) -> None:
    start = time.perf_counter()
    extract_answer(text, fmt)  # type: ignore[arg-type]
    assert time.perf_counter() - start < 0.5


def test_deep_nesting_gives_the_innermost_box() -> None:
    # The innermost box is the last one to open, and it is closed.
    assert extract_answer("\\boxed{" * 5000 + "1" + "}" * 5000, "boxed") == "1"


_PIECES = st.sampled_from(["\\boxed{", "{", "}", "\\", "<answer>", "</answer>", "\\{", "\\}", "42", " ", "\n", "$"])
_TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(_PIECES, max_size=300).map("".join),
    st.tuples(_PIECES, st.integers(1, 20_000)).map(lambda piece_count: piece_count[0] * piece_count[1]),
)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, fmt=st.sampled_from(["answer_tag", "boxed"]))
def test_fuzz_never_raises_and_is_fast(text: str, fmt: str) -> None:
    start = time.perf_counter()
    found = extract_answer(text, fmt)  # type: ignore[arg-type]
    assert time.perf_counter() - start < 0.5
    assert found is None or (found == found.strip() and found != "" and found in text)
