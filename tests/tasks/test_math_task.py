"""Math dataset task: loading and validating files, splitting, and math-verify scoring."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
