"""Row checks shared by the math dataset and predict files: which cells count as text, and UTF-8 errors."""

from __future__ import annotations

import datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from spiral_lit.errors import UserError
from spiral_lit.tasks.rows import BadCell, cell_text, utf8_lines


@pytest.mark.parametrize(
    ("value", "text"),
    [(" 1/2 ", "1/2"), (None, ""), ("", ""), (42, "42"), (0.5, "0.5"), (-3, "-3"), (Decimal("0.50"), "0.50"),
     (np.int64(7), "7"), (np.float64(2.5), "2.5")],
)  # fmt: skip
def test_strings_and_finite_numbers_are_text(value: object, text: str) -> None:
    assert cell_text(value, numbers_ok=True) == text


@pytest.mark.parametrize(
    ("value", "reason"),
    [(float("nan"), "is NaN"), (float("-inf"), "is -inf"), (Decimal("NaN"), "is NaN"), (True, "is a boolean"),
     ([1], "is a list"), ((1,), "is a list"), ({}, "is an object"), (b"1", "is bytes"), (bytearray(b"1"), "is bytes"),
     (datetime.date(2024, 1, 1), "is a date")],
)  # fmt: skip
def test_other_cells_say_what_they_are(value: object, reason: str) -> None:
    with pytest.raises(BadCell, match=rf"^{reason}"):
        cell_text(value, numbers_ok=True)


def test_numbers_are_refused_where_text_is_required() -> None:
    with pytest.raises(BadCell, match=r"is a number \(5\)"):
        cell_text(5, numbers_ok=False)


def test_non_utf8_offset_counts_the_byte_order_mark_and_earlier_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf{}\n\n  \xff\n")
    lines = utf8_lines(str(path), "src")
    assert next(lines) == (1, "{}\n")
    with pytest.raises(UserError, match=r"src is not UTF-8 text: line 3 \(byte 9\) holds b'\\xff'"):
        next(lines)
