"""Math problems from a local file or a ``datasets`` dataset, scored with math-verify.

Rows are read and checked once, at construction, so a wrong path or column name fails
before any model is loaded. math-verify parses bare LaTeX poorly (``\\frac12``,
``\\sqrt{2}``, ``\\dfrac{3}{4}`` and sets give nothing) but parses it well between ``$``
signs, so both the gold and the extracted answer are wrapped before parsing. Its own
``signal.alarm`` timeouts only work in a main thread; elsewhere they are switched off and
the :class:`~spiral_lit.tasks.verify.Verifier` timeout is the only guard.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Literal

from spiral_lit.tasks.base import Problem, Split, Task

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Seconds for each of math-verify's parse/verify calls: well inside the Verifier's default 5 s per item,
# so a slow sympy expression is cut off inside the worker instead of costing a worker restart.
_MATH_VERIFY_TIMEOUT_S = 1
# A final answer longer than this scores 0 unparsed [ours]: no dataset's reference answer comes close, math-verify's
# parse is super-linear in its input, and it logs the whole input on every timeout (issue 7).
_MAX_ANSWER_CHARS = 1000


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
        """
        if heldout_size < 0:
            raise ValueError(f"math: heldout_size must be >= 0, got {heldout_size}")
        path = os.path.expanduser(path)
        is_file = path.endswith(_FILE_SUFFIXES)
        # A hub id never starts with "/" or ".", so such a path must exist locally.
        if (is_file and not os.path.isfile(path)) or (path.startswith(("/", ".")) and not os.path.exists(path)):
            raise FileNotFoundError(f"math: path {path!r} does not exist")
        if is_file and heldout_split is not None:
            raise ValueError(
                f"math: heldout_split applies to datasets with splits, not to the file {path!r}; "
                "set heldout_size instead"
            )
        self.path = path
        self.answer_format = answer_format
        columns = {"question_column": question_column, "answer_column": answer_column}
        if solution_column is not None:
            columns["solution_column"] = solution_column
        train = _load_rows(path, train_split, columns, is_file)
        if heldout_split is not None:
            self._rows = {"train": train, "heldout": _load_rows(path, heldout_split, columns, is_file)}
        else:
            if len(train) <= heldout_size:
                raise ValueError(
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


def _parse(text: str, timeout: int | None) -> list[Any]:
    """math-verify's parse of ``text`` between ``$`` signs (where it parses LaTeX best), else of ``text`` as is."""
    from math_verify import parse

    if "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout)


def _load_rows(path: str, split: str, columns: dict[str, str], is_file: bool) -> list[dict[str, str]]:
    """The rows of ``path`` as {config key: cell text}, after checking columns and cells."""
    if is_file:
        records = _read_file(path, columns)
        where = repr(path)
    else:
        import datasets  # imported here: slow, and only needed for dataset dirs and hub ids

        dataset = datasets.load_dataset(path, split=split)
        where = f"{path!r} (split {split!r})"
        _check_columns(where, dataset.column_names, columns)
        records = [(f"row {i}", r) for i, r in enumerate(dataset.select_columns(list(columns.values())))]
    if not records:
        raise ValueError(f"math: {where} has no rows")
    return [_row(where, label, record, columns) for label, record in records]


def _row(where: str, label: str, record: dict[str, Any], columns: dict[str, str]) -> dict[str, str]:
    """One row as {config key: text}; question and answer must be non-empty."""
    row: dict[str, str] = {}
    for key, column in columns.items():
        value = record.get(column)
        text = "" if value is None else str(value).strip()
        if not text and key != "solution_column":
            raise ValueError(f"math: {where}, {label}: {column!r} ({key}) is empty or missing")
        if text:
            row[key] = text
    return row


def _check_columns(where: str, existing: list[str], columns: dict[str, str]) -> None:
    """Raise naming the file, the column, its config key and the columns that exist."""
    for key, column in columns.items():
        if column not in existing:
            raise ValueError(f"math: {where} has no column {column!r} (set by {key}); columns: {sorted(existing)}")


def _read_file(path: str, columns: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(label for errors, record) for every row of a .jsonl, .json or .parquet file; columns checked first."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"math: file {path!r} is empty")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        _check_columns(repr(path), pq.read_schema(path).names, columns)
        table = pq.read_table(path, columns=list(columns.values()))
        return [(f"row {i}", record) for i, record in enumerate(table.to_pylist())]
    records = _read_jsonl(path) if path.endswith(".jsonl") else _read_json(path)
    if records:
        # JSON has no schema: the first record's keys stand for the columns; later gaps fail per row.
        _check_columns(repr(path), list(records[0][1]), columns)
    return records


def _read_json(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Records of a JSON file holding a list of objects."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"math: {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"math: {path!r} must hold a JSON list of objects")
    return [(f"row {i}", r) for i, r in enumerate(data)]


def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Records of a JSON-lines file, each labelled by its line number; blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"math: {path!r} line {line_number} is not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"math: {path!r} line {line_number} is not a JSON object")
            records.append((f"line {line_number}", record))
    return records
