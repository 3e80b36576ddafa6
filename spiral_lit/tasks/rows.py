"""Row-by-row checks of the data files a user gives: UTF-8 text, one JSON object per line, cells of the right type.

``str(cell)`` turns anything into text: NaN into ``"nan"``, a list into ``"[1, 2]"``, bytes into ``"b'1'"``, and the
verifier would then score every response against that. So only strings and (where allowed) finite numbers count as
text here, and a number becomes its ``str`` (``42`` -> ``"42"``, ``0.5`` -> ``"0.5"``). A bad row is refused with a
:class:`~spiral_lit.errors.UserError` naming the file, the row (1-based line of a JSONL file, 0-based index of a JSON
list, Parquet file or dataset split), the column and what was expected; with ``on_bad_row: skip`` it is dropped
instead, and the count is logged once with the first few rows. Used by
:class:`~spiral_lit.tasks.math_task.MathDatasetTask` and by the ``predict`` input file (``spiral_lit.training.data``).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Literal

from spiral_lit.errors import UserError

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
_SHOWN = 3  # bad rows quoted in the skip log and in the "no rows left" error
_UTF8_BOM = b"\xef\xbb\xbf"


class BadCell(Exception):
    """A cell that cannot be used as text; the message says what it is instead (``is NaN``, ``is a list ([1])``)."""


def check_on_bad_row(value: str, key: str) -> None:
    """Refuse an ``on_bad_row`` value other than ``error``/``skip``, naming its YAML key."""
    if value not in ("error", "skip"):
        raise UserError(f"{key}={value!r} is not an allowed value; allowed: 'error', 'skip'")


def describe(value: Any) -> str:
    """What a value is, for an error message: ``a list ([1, 2])``, ``bytes (binary data)``, ``NaN``."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"bytes (binary data: {shown})"
    if isinstance(value, bool):
        return f"a boolean ({value!r}; quote it to mean the text)"
    if isinstance(value, (numbers.Real, Decimal)):
        number = float(value)
        return "NaN" if math.isnan(number) else str(number) if math.isinf(number) else f"a number ({shown})"
    if isinstance(value, dict):
        return f"an object ({shown})"
    if isinstance(value, (list, tuple)):
        return f"a list ({shown})"
    return f"a {type(value).__name__} ({shown})"


def cell_text(value: Any, *, numbers_ok: bool) -> str:
    """The cell as stripped text, ``""`` when it is missing (None) or blank; finite numbers as ``str`` when
    ``numbers_ok``. Anything else (NaN, inf, booleans, lists, objects, bytes, dates) raises :class:`BadCell`."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    is_number = isinstance(value, (numbers.Real, Decimal)) and not isinstance(value, bool)
    if numbers_ok and is_number and math.isfinite(float(value)):
        return str(value)
    raise BadCell(f"is {describe(value)}")


class BadRows:
    """The bad rows of one source: refused at once (``error``), or dropped, counted and logged once (``skip``)."""

    def __init__(self, source: str, on_bad_row: OnBadRow, option: str) -> None:
        """``source`` names the file in messages (``math: 'd.jsonl'``); ``option`` is the YAML key of ``on_bad_row``."""
        self.source, self.on_bad_row, self.option = source, on_bad_row, option
        self.skipped: list[str] = []

    def reject(self, where: str, reason: str) -> None:
        """Raise for row ``where`` (``line 4``, ``row 3``), or remember it when skipping."""
        if self.on_bad_row == "error":
            raise UserError(
                f"{self.source}, {where}: {reason}. Fix the row, or set {self.option}: skip to skip such rows "
                "(they are counted and logged)."
            )
        self.skipped.append(f"{where}: {reason}")

    def finish(self, kept: int) -> None:
        """Log the skipped rows once; with none kept, raise instead (nothing to train or predict on)."""
        if not self.skipped:
            return
        counts = f"skipped {len(self.skipped)} of {kept + len(self.skipped)} rows ({self.option}: skip)"
        first = " | ".join(self.skipped[:_SHOWN])
        if kept == 0:
            raise UserError(f"{self.source} has no rows left: {counts}; the first: {first}. Fix the rows.")
        log.warning(f"{self.source}: {counts}; the first: {first}")


def _not_utf8(source: str, line_number: int, offset: int, bad_bytes: bytes, file_start: bytes) -> UserError:
    """The error for bytes that are not UTF-8, with the line and the byte offset in the file."""
    utf16 = file_start.startswith((b"\xff\xfe", b"\xfe\xff"))
    return UserError(
        f"{source} is not UTF-8 text: line {line_number} (byte {offset}) holds {bad_bytes!r}, which is not valid "
        f"UTF-8{' (the file starts like UTF-16)' if utf16 else ''}. Save the file as UTF-8, for example with "
        f"`iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8 in > out`."
    )


def read_utf8(path: str, source: str) -> str:
    """The whole file as text (a UTF-8 byte order mark is dropped); not UTF-8 names the line and byte."""
    with open(path, "rb") as f:
        data = f.read()
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        start, end = bom + error.start, bom + error.end
        raise _not_utf8(source, data.count(b"\n", 0, start) + 1, start, data[start:end], data[:2]) from None


def utf8_lines(path: str, source: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line. Lines split on ``\\n`` only: JSON strings may hold
    U+2028, where ``str.splitlines`` would cut them. A line that is not UTF-8 raises, naming it and its byte."""
    offset = 0
    file_start = b""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            bom = len(_UTF8_BOM) if line_number == 1 and raw.startswith(_UTF8_BOM) else 0
            file_start = file_start or raw[:2]
            try:
                text = raw[bom:].decode("utf-8")
            except UnicodeDecodeError as error:
                start, end = bom + error.start, bom + error.end
                raise _not_utf8(source, line_number, offset + start, raw[start:end], file_start) from None
            offset += len(raw)
            if text.strip():
                yield line_number, text


def jsonl_records(path: str, source: str, bad: BadRows) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line of a JSONL file; a line that is not a JSON object is a bad row."""
    for line_number, text in utf8_lines(path, source):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            bad.reject(f"line {line_number}", f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            bad.reject(
                f"line {line_number}",
                f"a row must be a JSON object, one per line; this line is not a JSON object but {describe(record)}",
            )
            continue
        yield line_number, record
