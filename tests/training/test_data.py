"""data.py: a fixed held-out split, an endless training stream that avoids it, sharding and resume."""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from spiral_lit.errors import UserError
from spiral_lit.tasks import ChainSumTask, MathDatasetTask, Problem
from spiral_lit.training.data import ProblemDataModule, ProblemStream, read_predict_problems, train_indices


@dataclass
class _TrainerStub:
    """Only the three attributes ProblemDataModule reads from its trainer."""

    global_rank: int = 0
    world_size: int = 1
    training: bool = True


def _take(iterable, n: int) -> list:
    return list(itertools.islice(iterable, n))


def _uids(problems: list[Problem]) -> list[str]:
    return [p.uid for p in problems]


def test_heldout_split_is_fixed_and_sized() -> None:
    dm = ProblemDataModule(ChainSumTask(), heldout_size=30)
    again = ProblemDataModule(ChainSumTask(), heldout_size=30, seed=5)
    assert len(dm.heldout) == 30
    assert dm.heldout == again.heldout  # the shuffling seed does not move the held-out split
    assert _uids(dm.heldout) == [f"chain_sum/heldout/{i}" for i in range(30)]
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [30]
    small_batches = list(ProblemDataModule(ChainSumTask(), heldout_size=30, eval_batch_size=8).test_dataloader())
    assert [len(b) for b in small_batches] == [8, 8, 8, 6]
    assert small_batches[-1] == dm.heldout[24:]


def test_training_stream_never_shows_a_heldout_question() -> None:
    # 2 one-digit terms: only 81 distinct questions, so the raw train stream repeats held-out ones often.
    task = ChainSumTask(n_terms=2, digits=1)
    dm = ProblemDataModule(task, batch_size=10, heldout_size=20)
    heldout = {p.question for p in dm.heldout}
    raw = [task.problem(i, "train").question for i in range(3000)]
    assert sum(q in heldout for q in raw) > 100  # the filter has work to do
    train = [p for batch in _take(iter(dm.train_dataloader()), 300) for p in batch]
    assert len(train) == 3000
    assert not {p.question for p in train} & heldout
    # What is kept is the raw stream with the held-out questions dropped, in order.
    assert [p.question for p in train[:50]] == [q for q in raw if q not in heldout][:50]


def test_two_ranks_split_the_single_rank_stream() -> None:
    task = ChainSumTask()
    single = _take(ProblemStream(task, seed=0, rank=0, world_size=1, excluded=frozenset()), 200)
    rank0 = _take(ProblemStream(task, seed=0, rank=0, world_size=2, excluded=frozenset()), 100)
    rank1 = _take(ProblemStream(task, seed=0, rank=1, world_size=2, excluded=frozenset()), 100)
    assert _uids(rank0[:3]) == ["chain_sum/train/0", "chain_sum/train/2", "chain_sum/train/4"]
    assert _uids(rank1[:3]) == ["chain_sum/train/1", "chain_sum/train/3", "chain_sum/train/5"]
    assert not set(_uids(rank0)) & set(_uids(rank1))
    assert set(_uids(rank0)) | set(_uids(rank1)) == set(_uids(single))
    assert rank0 == single[0::2] and rank1 == single[1::2]


def test_train_dataloader_reads_rank_and_world_from_the_trainer() -> None:
    dm = ProblemDataModule(ChainSumTask(), batch_size=2, heldout_size=5)
    dm.trainer = _TrainerStub(global_rank=1, world_size=2)
    first = next(iter(dm.train_dataloader()))
    assert _uids(first) == ["chain_sum/train/1", "chain_sum/train/3"]


def test_finite_task_order_is_a_fresh_permutation_per_epoch() -> None:
    # random.Random("0/epoch/0").shuffle(range(5)) -> [3, 4, 0, 2, 1]; epoch 1 -> [1, 4, 3, 2, 0].
    assert _take(train_indices(5, seed=0), 10) == [3, 4, 0, 2, 1, 1, 4, 3, 2, 0]
    assert _take(train_indices(None, seed=0), 4) == [0, 1, 2, 3]


def test_skip_yields_exactly_the_continuation() -> None:
    task = ChainSumTask()
    whole = _take(ProblemStream(task, 0, 0, 1, frozenset()), 40)
    for k in (0, 1, 17):
        resumed = _take(ProblemStream(task, 0, 0, 1, frozenset(), skip=k), 40 - k)
        assert resumed == whole[k:]


def test_state_dict_round_trip_continues_the_stream() -> None:
    dm = ProblemDataModule(ChainSumTask(), batch_size=3, heldout_size=5)
    batches = _take(iter(dm.train_dataloader()), 6)
    dm.trainer = _TrainerStub(training=True)
    for batch in batches[:4]:
        assert dm.on_before_batch_transfer(batch, 0) is batch
    dm.trainer = _TrainerStub(training=False)  # validation batches do not count
    dm.on_before_batch_transfer(batches[4], 0)
    assert dm.consumed_batches == 4
    assert dm.state_dict() == {"consumed_batches": 4, "batch_size": 3, "world_size": 1}

    resumed = ProblemDataModule(ChainSumTask(), batch_size=3, heldout_size=5)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.consumed_batches == 4
    assert _take(iter(resumed.train_dataloader()), 2) == batches[4:6]


def test_resume_on_other_sizes_keeps_the_global_position() -> None:
    # 4 batches of 3 on 2 ranks = 24 problems consumed; on 1 rank with batches of 4 that is 6 batches.
    resumed = ProblemDataModule(ChainSumTask(), batch_size=4, heldout_size=5)
    resumed.trainer = _TrainerStub(world_size=1)
    with pytest.warns(UserWarning, match="data.batch_size=4 on 1 rank.*data.batch_size=3 on 2"):
        resumed.load_state_dict({"consumed_batches": 4, "batch_size": 3, "world_size": 2})
    assert resumed.consumed_batches == 6


def test_bad_sizes_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        ProblemDataModule(ChainSumTask(), batch_size=0)
    with pytest.raises(ValueError, match=r"data\.heldout_size"):
        ProblemDataModule(ChainSumTask(), heldout_size=0)
    with pytest.raises(ValueError, match=r"data\.eval_batch_size"):
        ProblemDataModule(ChainSumTask(), eval_batch_size=-1)


def _write_jsonl(path: Path, n: int) -> Path:
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_heldout_larger_than_the_dataset_is_rejected(tmp_path: Path) -> None:
    task = MathDatasetTask(str(_write_jsonl(tmp_path / "m.jsonl", 10)), heldout_size=3)
    assert ProblemDataModule(task, heldout_size=3).heldout[0].question == "What is 7+7?"
    with pytest.raises(ValueError, match=r"data\.heldout_size=4.*only 3"):
        ProblemDataModule(task, heldout_size=4)


def test_math_task_with_a_missing_file_fails_first(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        MathDatasetTask(missing)
    # Checked before the other arguments: heldout_split with a file would otherwise be a ValueError.
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        MathDatasetTask(missing, heldout_split="test", question_column="no_such_column")


def test_heldout_is_sharded_over_ranks_without_repeats() -> None:
    """5 problems on 2 ranks: 3 + 2, each evaluated once (DistributedSampler would repeat problem 0)."""
    dm = ProblemDataModule(ChainSumTask(), heldout_size=5, eval_batch_size=2)
    shards = []
    for rank in (0, 1):
        dm.trainer = _TrainerStub(global_rank=rank, world_size=2, training=False)
        shards.append([p for batch in dm.val_dataloader() for p in batch])
    assert _uids(shards[0]) == [f"chain_sum/heldout/{i}" for i in (0, 2, 4)]
    assert _uids(shards[1]) == [f"chain_sum/heldout/{i}" for i in (1, 3)]
    dm.trainer = _TrainerStub(global_rank=0, world_size=8, training=False)
    with pytest.raises(ValueError, match=r"data\.heldout_size=5 is smaller than the 8 processes"):
        dm.test_dataloader()


def test_predict_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "problems.jsonl"
    rows = [{"id": "q1", "question": "What is 1+2?", "answer": 3}, {"question": "What is 2+2?"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    dm = ProblemDataModule(ChainSumTask(), heldout_size=2, predict_path=str(path))
    problems = [p for batch in dm.predict_dataloader() for p in batch]
    assert [(p.uid, p.question, p.answer) for p in problems] == [
        ("q1", "What is 1+2?", "3"),
        ("predict/1", "What is 2+2?", ""),
    ]
    assert [p.metadata["has_reference"] for p in problems] == [True, False]
    with pytest.raises(ValueError, match=r"data\.predict_path is not set"):
        ProblemDataModule(ChainSumTask(), heldout_size=2).predict_dataloader()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"question": "ok"}\n{"question": "x",\n', r"line 2: not valid JSON"),
        ('{"question": "ok"}\n\n{"answer": "3"}\n', r'line 3: a row must be a JSON object with a string "question"'),
        ('["question"]\n', r"line 1: a row must be a JSON object"),
        ('{"question": "a", "answer": [1]}\n', r'line 1: "answer" must be a string or a number'),
        ('{"id": 7, "question": "a"}\n{"id": "7", "question": "b"}\n', r"line 2: \"id\" '7' repeats line 1"),
    ],
)
def test_bad_predict_rows_name_the_file_line_and_key(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        read_predict_problems(str(path))
    assert "bad.jsonl" in str(error.value)


def test_missing_predict_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.predict_path=.*nope\.jsonl"):
        ProblemDataModule(ChainSumTask(), heldout_size=2, predict_path=str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"question": "q", "answer": float("nan")}, r'"answer" must be a string or a number .*, but it is NaN'),
        ({"question": "q", "answer": {"a": 1}}, r'"answer" must be a string or a number .*, but it is an object'),
        ({"question": "q", "answer": True}, r'"answer" must be a string or a number .*, but it is a boolean'),
        ({"question": "q", "answer": " "}, r'"answer" must be a string or a number .*, but it is empty'),
        ({"question": " ", "answer": "1"}, r'a row .* "question" \(not empty\): "question" is empty or missing'),
        ({"question": ["q"]}, r'a row .* "question" \(not empty\): "question" is a list'),
        ({"question": "q", "id": [1]}, r'"id" must be a string or a number, but it is a list'),
    ],
)
def test_bad_predict_cells_are_user_errors_naming_file_line_and_key(tmp_path: Path, row: dict, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"data\.predict_path='.*bad\.jsonl', line 2: {match}"):
        ProblemDataModule(ChainSumTask(), heldout_size=2, predict_path=str(path))


def test_non_utf8_predict_file_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    text = '{"question": "ok"}\n\n{"question": "caf\xe9"}\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=rf"latin\.jsonl' is not UTF-8 text: line 3 \(byte {text.index(chr(0xE9))}\)"):
        read_predict_problems(str(path))


def test_predict_file_splits_lines_on_newlines_only(tmp_path: Path) -> None:
    # JSON strings may hold U+2028 unescaped; str.splitlines would cut the row there.
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "a\u2028b", "answer": "1"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [p.question for p in read_predict_problems(str(path))] == ["a\u2028b"]


def test_predict_skip_drops_and_counts_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.jsonl"
    rows = ['{"question": "a", "answer": 1}', '{"question": "b", "answer": NaN}', "{oops", '{"question": "c"}']
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        dm = ProblemDataModule(ChainSumTask(), heldout_size=2, predict_path=str(path), predict_on_bad_row="skip")
    assert [(p.uid, p.question) for p in dm.predict_problems or []] == [("predict/0", "a"), ("predict/1", "c")]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(r"p\.jsonl.*skipped 2 of 4 rows.*line 2: .*NaN.*line 3: not valid JSON", warning)
    with pytest.raises(UserError, match=r"predict_on_bad_row='drop'"):
        ProblemDataModule(ChainSumTask(), heldout_size=2, predict_path=str(path), predict_on_bad_row="drop")  # type: ignore[arg-type]


def test_missing_predict_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl"):
        read_predict_problems(str(tmp_path / "nope.jsonl"))
