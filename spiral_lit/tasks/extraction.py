"""Final-answer extraction and formatting: pure string functions, shared by every task.

Responses come from a policy under RL, so they can be anything: truncated, unbalanced,
100k characters of repeated ``\\boxed{``. Both extractors therefore use plain substring
search and one pass over the braces (no regular expression that could backtrack), run in
linear time, and never raise on a ``str``.
"""

from __future__ import annotations

import re
from typing import Literal

from spiral_lit.errors import UserError

AnswerFormat = Literal["answer_tag", "boxed"]

_OPEN_TAG = "<answer>"
_CLOSE_TAG = "</answer>"
_BOXED = "\\boxed{"
# An escaped character (so \{ and \} in LaTeX sets are not braces) or a brace; no nesting, so no backtracking.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_answer(response: str, fmt: AnswerFormat) -> str | None:
    """The last final answer in ``response`` written in ``fmt``, stripped; None when there is none or it is empty."""
    if fmt == "answer_tag":
        found = _last_answer_tag(response)
    elif fmt == "boxed":
        found = _last_boxed(response)
    else:
        raise UserError(f"answer format must be 'answer_tag' or 'boxed', got {fmt!r}")
    if found is None:
        return None
    found = found.strip()
    return found or None


def format_answer(answer: str, fmt: AnswerFormat) -> str:
    """``answer`` written so that :func:`extract_answer` finds it (used in worked solutions)."""
    if fmt == "answer_tag":
        return f"{_OPEN_TAG}{answer}{_CLOSE_TAG}"
    if fmt == "boxed":
        return f"{_BOXED}{answer}}}"
    raise UserError(f"answer format must be 'answer_tag' or 'boxed', got {fmt!r}")


def answer_instruction(fmt: AnswerFormat) -> str:
    """The sentence a prompt uses to ask for the final answer; short because tiny models read it too."""
    if fmt == "answer_tag":
        return "Give the final answer as <answer>...</answer>."
    if fmt == "boxed":
        return "Give the final answer as \\boxed{...}."
    raise UserError(f"answer format must be 'answer_tag' or 'boxed', got {fmt!r}")


def _last_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>`` that has a closing tag after it, up to the first such closing tag."""
    end = text.rfind(_CLOSE_TAG)
    if end < 0:
        return None
    start = text.rfind(_OPEN_TAG, 0, end)
    if start < 0:
        return None
    content_start = start + len(_OPEN_TAG)
    # The first closing tag after the opening one, so `<answer>1</answer> x </answer>` gives "1".
    return text[content_start : text.find(_CLOSE_TAG, content_start)]


def _last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{`` whose brace is closed; escaped ``\{`` and ``\}`` are not braces."""
    starts = _find_all(text, _BOXED)
    if not starts:
        return None
    closing = _matching_braces(text)
    for start in reversed(starts):
        brace = start + len(_BOXED) - 1
        close = closing.get(brace)
        if close is not None:
            return text[brace + 1 : close]
    return None


def _find_all(text: str, needle: str) -> list[int]:
    """Start offsets of every occurrence of ``needle``."""
    found: list[int] = []
    at = text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


def _matching_braces(text: str) -> dict[int, int]:
    """Offset of each opening brace -> offset of its closing brace, in one pass with a stack."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKENS.finditer(text):
        ch = token.group()
        if ch == "{":
            stack.append(token.start())
        elif ch == "}" and stack:
            closing[stack.pop()] = token.start()
    return closing
