"""Math dataset task: loading and validating files, splitting, and math-verify scoring."""

from __future__ import annotations

import json
import logging
import pickle
import re
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spiral_lit.errors import UserError
from spiral_lit.tasks import MathDatasetTask, Problem

_ROWS = [
    {"problem": f"What is {i} + {i}?", "answer": str(2 * i), "solution": f"{i}+{i}=\\boxed{{{2 * i}}}"}
    for i in range(10)
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _gold(answer: str) -> Problem:
    return Problem(uid="math/train/0", question="q", answer=answer)


def test_jsonl_split_holds_out_the_last_rows(tmp_path: Path) -> None:
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=3, solution_column="solution")
    assert (task.num_problems("train"), task.num_problems("heldout")) == (7, 3)
    assert task.problem(0, "heldout").question == "What is 7 + 7?"
    assert {task.problem(i, "train").question for i in range(7)}.isdisjoint(
        {task.problem(i, "heldout").question for i in range(3)}
    )
    problem = task.problem(2, "train")
    assert (problem.uid, problem.answer, problem.solution) == ("math/train/2", "4", "2+2=\\boxed{4}")
    assert task.extract_answer(problem.solution or "") == "4"


def test_parquet_json_and_renamed_columns(tmp_path: Path) -> None:
    rows = [{"q": r["problem"], "a": int(r["answer"])} for r in _ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        task = MathDatasetTask(str(tmp_path / name), question_column="q", answer_column="a", heldout_size=2)
        assert task.problem(3, "train").answer == "6"  # integer cells become text
        assert task.problem(3, "train").solution is None


def test_local_dataset_dir_with_splits(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    _jsonl(tmp_path / "ds" / "train.jsonl", _ROWS)
    _jsonl(tmp_path / "ds" / "test.jsonl", _ROWS[:2])
    task = MathDatasetTask(str(tmp_path / "ds"), heldout_split="test")
    assert (task.num_problems("train"), task.num_problems("heldout")) == (10, 2)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MathDatasetTask(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no_dir"):
        MathDatasetTask(str(tmp_path / "no_dir"))


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        MathDatasetTask(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.jsonl.*no rows"):
        MathDatasetTask(str(tmp_path / "blank.jsonl"))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_column_names_file_column_key_and_existing_columns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _jsonl(path, _ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(_ROWS), path)
    with pytest.raises(ValueError, match=r"d\.\w+.*'question'.*question_column.*\['answer', 'problem', 'solution'\]"):
        MathDatasetTask(str(path), question_column="question")
    with pytest.raises(ValueError, match="'worked'.*solution_column"):
        MathDatasetTask(str(path), solution_column="worked")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_ROWS[0]) + "\n" + '{"problem": "x", \n' + json.dumps(_ROWS[1]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl.*line 2"):
        MathDatasetTask(str(path))
    path.write_text(json.dumps(_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="bad.jsonl.*line 2.*not a JSON object"):
        MathDatasetTask(str(path))


@pytest.mark.parametrize("bad", [{"problem": "", "answer": "1"}, {"problem": "q", "answer": None}, {"problem": "q"}])
def test_empty_question_or_answer_names_the_row(tmp_path: Path, bad: dict) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [*_ROWS[:3], bad, *_ROWS[3:]])
    with pytest.raises(ValueError, match="d.jsonl.*line 4"):
        MathDatasetTask(path)


def test_invalid_split_settings(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _ROWS)
    with pytest.raises(ValueError, match="heldout_size=10"):
        MathDatasetTask(path, heldout_size=10)
    with pytest.raises(ValueError, match="heldout_split"):
        MathDatasetTask(path, heldout_split="test")


@pytest.mark.parametrize(
    ("gold", "extracted", "reward"),
    [("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{\\frac{1}{2}}", "\\frac12", 1.0), ("\\frac{1}{2}", "1/2", 1.0),
     ("0.5", "\\dfrac{1}{2}", 1.0), ("\\frac{1}{2}", "0.6", 0.0), ("3", "3.0", 1.0), ("\\sqrt{2}", "\\sqrt 2", 1.0),
     ("\\{1,2\\}", "\\{2,1\\}", 1.0), ("10", "x = 10", 1.0), ("$5$", "5", 1.0), ("10", "ten", 0.0),
     ("5", "5, 6", 0.0), ("42", "}{\\frac{", 0.0), ("42", "\\boxed{" * 50, 0.0)],
)  # fmt: skip
def test_score_follows_math_verify(gold: str, extracted: str, reward: float, tmp_path: Path) -> None:
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=1)
    assert task.score(extracted, _gold(gold)) == reward


def test_score_works_outside_the_main_thread(tmp_path: Path) -> None:
    # math-verify's signal-based timeouts raise outside the main thread; the task switches them off there.
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=1)
    rewards: list[float] = []
    thread = threading.Thread(target=lambda: rewards.append(task.score("0.5", _gold("\\frac{1}{2}"))))
    thread.start()
    thread.join()
    assert rewards == [1.0]


def test_pickle_round_trip(tmp_path: Path) -> None:
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=2, answer_format="answer_tag")
    clone = pickle.loads(pickle.dumps(task))
    assert clone.problem(1, "heldout") == task.problem(1, "heldout")
    assert clone.extract_answer("<answer>3</answer>") == "3"


# ----------------------------------------------------------------------------- cells checked by type, row by row
_EXPECTED_ANSWER = r"expected a non-empty string or a finite number"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"problem": "q", "answer": float("nan")}, rf"'answer' \(answer_column\) is NaN; {_EXPECTED_ANSWER}"),
        ({"problem": "q", "answer": float("inf")}, rf"'answer' \(answer_column\) is inf; {_EXPECTED_ANSWER}"),
        ({"problem": "q", "answer": {"a": 1}}, rf"'answer' \(answer_column\) is an object .*; {_EXPECTED_ANSWER}"),
        ({"problem": "q", "answer": [1, 2]}, rf"'answer' \(answer_column\) is a list .*; {_EXPECTED_ANSWER}"),
        ({"problem": "q", "answer": True}, rf"'answer' \(answer_column\) is a boolean .*; {_EXPECTED_ANSWER}"),
        ({"problem": "q", "answer": "  "}, rf"'answer' \(answer_column\) is empty or missing; {_EXPECTED_ANSWER}"),
        ({"problem": 5, "answer": "1"}, r"'problem' \(question_column\) is a number .*; expected a non-empty string"),
        ({"problem": ["q"], "answer": "1"}, r"'problem' \(question_column\) is a list .*; expected a non-empty string"),
        ({"problem": "q", "answer": "1", "solution": [1]}, r"'solution' \(solution_column\) is a list .*; expected a"),
    ],
)
def test_bad_cells_are_refused_naming_file_line_column_and_expectation(tmp_path: Path, bad: dict, match: str) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [*_ROWS[:3], bad, *_ROWS[3:]])
    with pytest.raises(UserError, match=rf"d\.jsonl', line 4: {match}") as error:
        MathDatasetTask(path, solution_column="solution")
    assert "on_bad_row" in str(error.value)  # the fix names the option that skips such rows


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (pa.array([b"1", b"2", b"3"]), r"is bytes \(binary data"),
        (pa.array([1.0, float("nan"), 3.0]), r"is NaN"),
        (pa.array([[1], [2], [3]]), r"is a list"),
        (pa.array([{"x": 1}, {"x": 2}, {"x": 3}]), r"is an object"),
        (pa.array(["1", "", "3"]), r"is empty or missing"),
        (pa.array(["1", None, "3"]), r"is empty or missing"),
    ],
)
def test_bad_parquet_cells_name_the_row_index(tmp_path: Path, column: pa.Array, match: str) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a", "b", "c"], "answer": column}), path)
    # the first bad row of the column is named (row 0 for whole-column type errors)
    with pytest.raises(UserError, match=rf"d\.parquet', row [01]: 'answer' \(answer_column\) {match}"):
        MathDatasetTask(str(path), heldout_size=1)


def test_bad_cells_of_a_dataset_dir_name_split_and_row(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"problem": ["a", "b", "c", "d"], "answer": [1.0, 2.0, float("nan"), 4.0]}),
                   tmp_path / "ds" / "train.parquet")  # fmt: skip
    with pytest.raises(UserError, match=r"ds' \(split 'train'\), row 2: 'answer' \(answer_column\) is NaN"):
        MathDatasetTask(str(tmp_path / "ds"), heldout_size=1)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_numeric_answers_become_their_text(tmp_path: Path, suffix: str) -> None:
    rows = [{"problem": "a", "answer": 42}, {"problem": "b", "answer": 0.5}, {"problem": "c", "answer": "x"}]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:  # a parquet column has one type: numbers only
        pq.write_table(pa.table({"problem": ["a", "b", "c"], "answer": [42, 0, 7]}), path)
    task = MathDatasetTask(str(path), heldout_size=1)
    answers = [task.problem(i, "train").answer for i in range(2)]
    assert answers == (["42", "0"] if suffix == "parquet" else ["42", "0.5"])


def test_skip_drops_and_counts_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = [{"problem": "q", "answer": [1]}, {"problem": "q", "answer": float("nan")}, {"problem": "", "answer": "1"}]
    path = _jsonl(tmp_path / "d.jsonl", [_ROWS[0], *bad, *_ROWS[1:], {"problem": "q", "answer": {}}])
    with caplog.at_level(logging.WARNING):
        task = MathDatasetTask(path, heldout_size=2, on_bad_row="skip")
    assert task.num_problems("train") + task.num_problems("heldout") == len(_ROWS)
    assert task.problem(1, "train").question == _ROWS[1]["problem"]  # the rows after the bad ones, in order
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once
    assert re.search(r"d\.jsonl.*skipped 4 of 14 rows.*line 2.*line 3.*line 4", warnings[0])
    assert "line 14" not in warnings[0]  # only the first few are listed


def test_skip_that_leaves_no_row_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "q", "answer": [1]}] * 3)
    with pytest.raises(UserError, match=r"d\.jsonl.*no rows left.*skipped 3.*line 1: 'answer'"):
        MathDatasetTask(path, heldout_size=1, on_bad_row="skip")


def test_invalid_on_bad_row_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"on_bad_row='drop'.*'error', 'skip'"):
        MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), on_bad_row="drop")  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_non_utf8_file_names_file_line_and_byte(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin.{suffix}"
    first = json.dumps(_ROWS[0])
    if suffix == "jsonl":
        text = first + "\n" + '{"problem": "caf\xe9", "answer": "1"}\n'
    else:
        text = "[" + first + ",\n" + '{"problem": "caf\xe9", "answer": "1"}]'
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe9")
    with pytest.raises(UserError, match=rf"latin\.{suffix}' is not UTF-8 text: line 2 \(byte {offset}\)"):
        MathDatasetTask(str(path), heldout_size=1)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in _ROWS).encode())
    assert MathDatasetTask(str(path), heldout_size=1).problem(0, "train").question == _ROWS[0]["problem"]


def test_file_errors_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    _jsonl(tmp_path / "d.jsonl", _ROWS)
    (tmp_path / "list.json").write_text('{"problem": "q"}')
    with pytest.raises(UserError, match="empty"):
        MathDatasetTask(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match=r"garbage\.parquet' is not a Parquet file"):
        MathDatasetTask(str(tmp_path / "garbage.parquet"))
    with pytest.raises(UserError, match="has no column 'question'"):
        MathDatasetTask(str(tmp_path / "d.jsonl"), question_column="question")
    with pytest.raises(UserError, match="JSON list of objects"):
        MathDatasetTask(str(tmp_path / "list.json"))


def test_a_column_present_only_in_later_rows_is_checked_per_row(tmp_path: Path) -> None:
    # JSON has no schema: a first row without the column is a bad row, not a missing column.
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "q"}, *_ROWS])
    with pytest.raises(UserError, match=r"line 1: 'answer' \(answer_column\) is empty or missing"):
        MathDatasetTask(path)
    assert MathDatasetTask(path, heldout_size=1, on_bad_row="skip").num_problems("train") == len(_ROWS) - 1


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl.*does not exist"):
        MathDatasetTask(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    "same",
    [["1/2", "0.5", "\\frac{1}{2}", "\\dfrac12", "2/4", "0.50", "$\\frac{1}{2}$"], ["3", "3.0", "003"],
     ["\\sqrt{2}", "2^{1/2}"], ["\\{1,2\\}", "\\{2,1\\}"], ["x+1", "1+x"]],
)  # fmt: skip
def test_answer_key_joins_what_math_verify_parses_alike(same: list[str], tmp_path: Path) -> None:
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=1)
    assert len({task.answer_key(a, _gold("1")) for a in same}) == 1


def test_answer_key_keeps_different_values_apart(tmp_path: Path) -> None:
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=1)
    answers = ["1/2", "0.6", "1/3", "0.333", "3", "\\sqrt{3}", "(1,2)", "[1,2)", "x-1", "ten", "}{\\frac{"]
    answers += ["1.5^{9}", "3/2^{9}"]  # a power of 3/2 and 3 over a power of 2
    assert len({task.answer_key(a, _gold("1")) for a in answers}) == len(answers)


def test_answer_key_falls_back_to_the_normalised_text(tmp_path: Path) -> None:
    # Bounded: too long, too slow for math-verify's timeout (a huge binomial), or outside the main thread (where
    # math-verify's timeout cannot work) -> ("text", the answer with whitespace runs collapsed).
    task = MathDatasetTask(_jsonl(tmp_path / "d.jsonl", _ROWS), heldout_size=1)
    assert task.answer_key("0.5", _gold("1")) == ("math", "(1/2)")
    long = "1 + " * 50 + "1"
    assert task.answer_key(f" {long}  ", _gold("1")) == ("text", long)
    start = time.perf_counter()
    assert task.answer_key("\\binom{10000000}{5000000}", _gold("1")) == ("text", "\\binom{10000000}{5000000}")
    assert time.perf_counter() - start < 4.0
    keys: list[object] = []
    thread = threading.Thread(target=lambda: keys.extend(task.answer_key(a, _gold("1")) for a in ("0.5", " 1/2")))
    thread.start()
    thread.join()
    assert keys == [("text", "0.5"), ("text", "1/2")]
