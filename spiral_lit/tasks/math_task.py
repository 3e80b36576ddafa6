"""Math problems from a local file or a ``datasets`` dataset, scored with math-verify.

Rows are read and checked once, at construction, so a wrong path, column name or cell fails
before any model is loaded. Cells are checked by type, row by row (:mod:`spiral_lit.tasks.rows`):
an answer must be a non-empty string or a finite number (``42`` becomes ``"42"``), a question a
non-empty string; ``on_bad_row: skip`` drops and counts the rows that are not.

math-verify parses bare LaTeX poorly (``\\frac12``, ``\\sqrt{2}``, ``\\dfrac{3}{4}`` and sets give
nothing) but parses it well between ``$`` signs, so both the gold and the extracted answer are
wrapped before parsing. Its own ``signal.alarm`` timeouts only work in a main thread; elsewhere
they are switched off and the :class:`~spiral_lit.tasks.verify.Verifier` timeout is the only guard.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from typing import Any, Literal

from spiral_lit.errors import PathNotFoundError, UserError
from spiral_lit.tasks.answer_forms import math_key
from spiral_lit.tasks.base import Problem, Split, Task
from spiral_lit.tasks.rows import BadCell, BadRows, OnBadRow, cell_text, check_on_bad_row, jsonl_records, read_utf8

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Seconds for each of math-verify's parse/verify calls: well inside the Verifier's default 5 s per item,
# so a slow sympy expression is cut off inside the worker instead of costing a worker restart.
_MATH_VERIFY_TIMEOUT_S = 1
# A final answer longer than this scores 0 unparsed [ours]: no dataset's reference answer comes close, math-verify's
# parse is super-linear in its input, and it logs the whole input on every timeout (docs/algorithm.md §2.6).
_MAX_ANSWER_CHARS = 1000
# What each column's cells must hold, for error messages.
_EXPECTED = {
    "question_column": "a non-empty string",
    "answer_column": "a non-empty string or a finite number",
    "solution_column": "a string, null or no value",
}
_ON_BAD_ROW_KEY = "data.task.init_args.on_bad_row"


class MathDatasetTask(Task):
    """Question/answer rows from a ``.jsonl``/``.json``/``.parquet`` file, a local dataset dir or a hub id."""

    name = "math"

    def __init__(
        self,
        path: str,
        question_column: str = "problem",
        answer_column: str = "answer",
        solution_column: str | None = None,
        train_split: str = "train",
        heldout_split: str | None = None,
        heldout_size: int = 500,
        answer_format: Literal["answer_tag", "boxed"] = "boxed",
        on_bad_row: OnBadRow = "error",
    ) -> None:
        """
        Args:
            path: A ``.jsonl``/``.json`` (list of objects)/``.parquet`` file, a local dataset dir or a hub id.
            question_column: Column holding the problem text.
            answer_column: Column holding the reference final answer (may be ``\\boxed{...}``).
            solution_column: Column holding a worked solution (for warm-start SFT), if any.
            train_split: Split of a dataset dir or hub id to train on (ignored for a single file).
            heldout_split: Split to hold out; None holds out the last ``heldout_size`` training rows.
            heldout_size: Rows held out when ``heldout_split`` is None.
            answer_format: How responses must write their final answer.
            on_bad_row: A row whose question or answer is empty or of the wrong type (NaN, a list, an object,
                bytes): ``error`` refuses the dataset naming the row; ``skip`` drops it, and the count is logged.
        """
        check_on_bad_row(on_bad_row, _ON_BAD_ROW_KEY)
        if heldout_size < 0:
            raise UserError(f"math: heldout_size must be >= 0, got {heldout_size}")
        path = os.path.expanduser(path)
        is_file = path.endswith(_FILE_SUFFIXES)
        # A hub id never starts with "/" or ".", so such a path must exist locally.
        if (is_file and not os.path.isfile(path)) or (path.startswith(("/", ".")) and not os.path.exists(path)):
            raise PathNotFoundError(f"math: path {path!r} does not exist (data.task.init_args.path); check the path")
        if is_file and heldout_split is not None:
            raise UserError(
                f"math: heldout_split applies to datasets with splits, not to the file {path!r}; "
                "set heldout_size instead"
            )
        self.path = path
        self.answer_format = answer_format
        columns = {"question_column": question_column, "answer_column": answer_column}
        if solution_column is not None:
            columns["solution_column"] = solution_column
        train = _load_rows(path, train_split, columns, is_file, on_bad_row)
        if heldout_split is not None:
            self._rows = {"train": train, "heldout": _load_rows(path, heldout_split, columns, is_file, on_bad_row)}
        else:
            if len(train) <= heldout_size:
                raise UserError(
                    f"math: {path!r} has {len(train)} rows, not more than heldout_size={heldout_size}; "
                    "lower heldout_size or set heldout_split"
                )
            cut = len(train) - heldout_size
            self._rows = {"train": train[:cut], "heldout": train[cut:]}

    def num_problems(self, split: Split) -> int | None:
        """Rows in the split."""
        return len(self._rows[split])

    def problem(self, index: int, split: Split) -> Problem:
        """Row ``index`` of the split."""
        if not 0 <= index < len(self._rows[split]):
            raise IndexError(f"math: index {index} out of range for split {split!r} of {len(self._rows[split])} rows")
        row = self._rows[split][index]
        return Problem(
            uid=f"{self.name}/{split}/{index}",
            question=row["question_column"],
            answer=row["answer_column"],
            solution=row.get("solution_column"),
        )

    def score(self, extracted_answer: str, problem: Problem) -> float:
        """1.0 when math-verify finds the extracted answer equal to the gold one, else 0.0."""
        from math_verify import verify  # imported here so verifier workers of other tasks start fast

        if len(extracted_answer) > _MAX_ANSWER_CHARS:
            return 0.0
        # math-verify's timeouts use signal.alarm, which raises outside the main thread.
        timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        gold = _parse(problem.answer, timeout)
        pred = _parse(extracted_answer, timeout)
        return float(verify(gold, pred, timeout_seconds=timeout))

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """math-verify's parse, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` vote together; bounded by a length cap and
        math-verify's timeout, else the normalised text (:func:`spiral_lit.tasks.answer_forms.math_key`)."""
        return math_key(answer)


def _parse(text: str, timeout: int | None) -> list[Any]:
    """math-verify's parse of ``text`` between ``$`` signs (where it parses LaTeX best), else of ``text`` as is."""
    from math_verify import parse

    if "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout)


def _load_rows(
    path: str, split: str, columns: dict[str, str], is_file: bool, on_bad_row: OnBadRow
) -> list[dict[str, str]]:
    """The rows of ``path`` as {config key: cell text}, after checking columns and cells."""
    where = repr(path) if is_file else f"{path!r} (split {split!r})"
    bad = BadRows(f"math: {where}", on_bad_row, _ON_BAD_ROW_KEY)
    if is_file:
        records = _read_file(path, columns, bad)
    else:
        import datasets  # imported here: slow, and only needed for dataset dirs and hub ids

        dataset = datasets.load_dataset(path, split=split)
        _check_columns(where, dataset.column_names, columns)
        records = [(f"row {i}", r) for i, r in enumerate(dataset.select_columns(list(columns.values())))]
    rows = []
    for label, record in records:
        try:
            rows.append(_row(record, columns))
        except BadCell as reason:
            bad.reject(label, str(reason))
    bad.finish(len(rows))
    if not rows:
        raise UserError(f"math: {where} has no rows; expected one problem per row")
    return rows


def _row(record: dict[str, Any], columns: dict[str, str]) -> dict[str, str]:
    """One row as {config key: text}; raises :class:`BadCell` naming the column, what it holds and what it must."""
    row: dict[str, str] = {}
    for key, column in columns.items():
        try:
            text = cell_text(record.get(column), numbers_ok=key == "answer_column")
        except BadCell as reason:
            raise BadCell(f"{column!r} ({key}) {reason}; expected {_EXPECTED[key]}") from None
        if not text and key != "solution_column":
            raise BadCell(f"{column!r} ({key}) is empty or missing; expected {_EXPECTED[key]}")
        if text:
            row[key] = text
    return row


def _check_columns(where: str, existing: list[str], columns: dict[str, str]) -> None:
    """Raise naming the file, the column, its config key and the columns that exist."""
    for key, column in columns.items():
        if column not in existing:
            raise UserError(
                f"math: {where} has no column {column!r} (set by {key}); columns: {sorted(existing)}. "
                f"Set data.task.init_args.{key} to one of them."
            )


def _read_file(path: str, columns: dict[str, str], bad: BadRows) -> list[tuple[str, dict[str, Any]]]:
    """(label for errors, record) for every row of a .jsonl, .json or .parquet file; columns checked first."""
    if os.path.getsize(path) == 0:
        raise UserError(f"math: file {path!r} is empty; expected one problem per row")
    if path.endswith(".parquet"):
        return _read_parquet(path, columns)
    if path.endswith(".jsonl"):
        records = [(f"line {n}", r) for n, r in jsonl_records(path, f"math: {path!r}", bad)]
    else:
        records = _read_json(path)
    if records:
        # JSON has no schema: a column that no row has is missing; a row without it is a bad row.
        _check_columns(repr(path), sorted({key for _, r in records for key in r}), columns)
    return records


def _read_parquet(path: str, columns: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(``row i``, record) for every row of a Parquet file, read as Python values (bytes stay bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"math: {path!r} is not a Parquet file ({error}); check the file or its suffix") from None
    _check_columns(repr(path), schema.names, columns)
    table = pq.read_table(path, columns=list(columns.values()))
    return [(f"row {i}", record) for i, record in enumerate(table.to_pylist())]


def _read_json(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Records of a JSON file holding a list of objects."""
    import json

    try:
        data = json.loads(read_utf8(path, f"math: {path!r}"))
    except json.JSONDecodeError as e:
        raise UserError(f"math: {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"math: {path!r} must hold a JSON list of objects (or use a .jsonl file, one per line)")
    return [(f"row {i}", r) for i, r in enumerate(data)]
