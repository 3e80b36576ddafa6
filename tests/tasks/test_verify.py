"""The verifier: rewards and counts, and that a hanging, raising or crashing scorer never blocks a batch."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spiral_lit.tasks import ChainSumTask, MathDatasetTask, Problem, ReasoningGymTask, Task, Verifier
from spiral_lit.tasks.base import Split


class ScriptedTask(Task):
    """A task whose ``score`` does what the extracted answer says: hang, raise, die, nan, or return a number."""

    name = "scripted"

    def num_problems(self, split: Split) -> int | None:
        return None

    def problem(self, index: int, split: Split) -> Problem:
        return Problem(uid=f"scripted/{split}/{index}", question="?", answer="1")

    def score(self, extracted_answer: str, problem: Problem) -> float:
        if extracted_answer == "hang":
            time.sleep(3600)
        if extracted_answer == "raise":
            raise RuntimeError("boom")
        if extracted_answer == "die":
            os._exit(3)
        return float(extracted_answer)


def _scripted(answers: list[str | None]) -> tuple[list[Problem], list[str]]:
    task = ScriptedTask()
    responses = ["no answer here" if a is None else f"<answer>{a}</answer>" for a in answers]
    return [task.problem(i, "train") for i in range(len(answers))], responses


@pytest.fixture(scope="module")
def chain_sum_verifier() -> Iterator[Verifier]:
    with Verifier(ChainSumTask(), timeout_s=5.0, num_workers=2) as verifier:
        yield verifier


@pytest.mark.parametrize("num_workers", [0, 2])
def test_good_wrong_and_malformed_responses(num_workers: int, chain_sum_verifier: Verifier) -> None:
    task = ChainSumTask()
    problems = [task.problem(i, "train") for i in range(40)]
    responses = []
    for i, problem in enumerate(problems):
        answer = int(problem.answer) + (i % 2)  # odd items are wrong
        responses.append(f"...\n<answer>{answer}</answer>" if i % 4 != 3 else "I give up <answer>")
    verifier = chain_sum_verifier if num_workers else Verifier(task, num_workers=0)
    result = verifier.score(problems, responses)
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(40)]
    assert result.rewards == expected
    assert result.extracted[0] == problems[0].answer
    assert result.extracted[3] is None
    assert (result.n_unparsed, result.n_errors, result.n_timeouts) == (10, 0, 0)


def test_worker_pool_is_reused_and_empty_batches_are_fine(chain_sum_verifier: Verifier) -> None:
    task = ChainSumTask()
    problems = [task.problem(i, "heldout") for i in range(500)]
    chain_sum_verifier.score(problems[:1], [problems[0].solution or ""])
    start = time.perf_counter()
    result = chain_sum_verifier.score(problems, [p.solution or "" for p in problems])
    assert time.perf_counter() - start < 1.0  # chunked IPC: no per-call start-up, no per-item round trip
    assert result.rewards == [1.0] * 500
    assert chain_sum_verifier.score([], []).rewards == []
    assert chain_sum_verifier.score(problems[:2], ["", ""]).n_unparsed == 2


def test_hang_times_out_alone_and_the_rest_is_scored() -> None:
    answers: list[str | None] = ["1", "0.25", "hang", "1", "0", None, "1", "0.5", "1", "1"]
    problems, responses = _scripted(answers)
    with Verifier(ScriptedTask(), timeout_s=0.5, num_workers=1) as verifier:
        verifier.score(problems[:1], responses[:1])  # start the worker outside the timed part
        start = time.perf_counter()
        result = verifier.score(problems, responses)
        elapsed = time.perf_counter() - start
        assert result.rewards == [1.0, 0.25, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 1.0]
        assert (result.n_timeouts, result.n_errors, result.n_unparsed) == (1, 0, 1)
        assert elapsed < 5.0
        # The replacement worker serves the next batch.
        assert verifier.score(problems[:2], responses[:2]).rewards == [1.0, 0.25]


def test_several_hangs_with_two_workers() -> None:
    answers: list[str | None] = ["hang", "1", "hang", "1", "1", "hang", *(["1"] * 20)]
    problems, responses = _scripted(answers)
    with Verifier(ScriptedTask(), timeout_s=0.5, num_workers=2) as verifier:
        result = verifier.score(problems, responses)
    assert result.n_timeouts == 3
    assert result.rewards == [0.0 if a == "hang" else 1.0 for a in answers]


def test_raise_nan_death_and_clamping() -> None:
    answers: list[str | None] = ["raise", "nan", "die", "2.5", "-1", "0.5", "inf", "1"]
    problems, responses = _scripted(answers)
    with Verifier(ScriptedTask(), timeout_s=2.0, num_workers=1) as verifier:
        result = verifier.score(problems, responses)
    assert result.rewards == [0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    assert (result.n_errors, result.n_timeouts, result.n_unparsed) == (3, 0, 0)


def test_inline_mode_counts_errors() -> None:
    problems, responses = _scripted(["raise", "nan", "1", None])
    result = Verifier(ScriptedTask(), num_workers=0).score(problems, responses)
    assert result.rewards == [0.0, 0.0, 1.0, 0.0]
    assert (result.n_errors, result.n_unparsed) == (2, 1)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Verifier(ChainSumTask(), timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        Verifier(ChainSumTask(), num_workers=-1)
    with pytest.raises(ValueError, match="2 problems but 1 responses"):
        Verifier(ChainSumTask(), num_workers=0).score([ChainSumTask().problem(i, "train") for i in range(2)], ["x"])


def test_reasoning_gym_and_math_tasks_score_in_workers(tmp_path: Path) -> None:
    # Both tasks are rebuilt in the worker (reasoning-gym from its arguments); math-verify runs its
    # signal-based timeouts in the worker's main thread.
    rg = ReasoningGymTask(["gcd", "chain_sum"], size=20, heldout_size=2)
    problems = [rg.problem(i, "train") for i in range(6)]
    with Verifier(rg, timeout_s=5.0) as verifier:
        result = verifier.score(
            problems * 2, [f"<answer>{p.answer}</answer>" for p in problems] + ["<answer>x</answer>"] * 6
        )
    assert result.rewards == [1.0] * 6 + [0.0] * 6
    (tmp_path / "d.jsonl").write_text('{"problem": "half?", "answer": "\\\\frac{1}{2}"}\n' * 3)
    math = MathDatasetTask(str(tmp_path / "d.jsonl"), heldout_size=1)
    with Verifier(math, timeout_s=5.0) as verifier:
        result = verifier.score([math.problem(0, "train")] * 3, ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}"])
    assert (result.rewards, result.n_errors) == ([1.0, 1.0, 0.0], 0)
