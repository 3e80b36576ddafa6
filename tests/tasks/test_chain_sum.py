"""The built-in chain-sum task: determinism, worked solutions, scoring, wrong candidates."""

from __future__ import annotations

import pickle
import random

import pytest

from spiral_lit.tasks import ChainSumTask, Problem


def _check_lines(solution: str, terms: list[int]) -> int:
    """Assert every line adds the next term to the previous line's result; return the final answer."""
    *lines, last = solution.split("\n")
    assert len(lines) == len(terms) - 1
    partial = terms[0]
    for line, term in zip(lines, terms[1:], strict=True):
        left, result = line.split("=")
        a, b = left.split("+")
        assert (int(a), int(b)) == (partial, term)
        assert int(result) == int(a) + int(b)
        partial = int(result)
    assert last == f"<answer>{partial}</answer>"
    return partial


def test_hand_computed_solution_layout() -> None:
    task = ChainSumTask()
    problem = task.problem(0, "train")
    terms = problem.metadata["terms"]
    a, b, c, d, e = terms
    assert problem.question == f"{a}+{b}+{c}+{d}+{e}"
    assert problem.solution == (
        f"{a}+{b}={a + b}\n{a + b}+{c}={a + b + c}\n{a + b + c}+{d}={a + b + c + d}\n"
        f"{a + b + c + d}+{e}={a + b + c + d + e}\n<answer>{a + b + c + d + e}</answer>"
    )
    assert problem.uid == "chain_sum/train/0"


@pytest.mark.parametrize(("n_terms", "digits"), [(2, 1), (5, 3), (8, 6)])
def test_problems_are_well_formed(n_terms: int, digits: int) -> None:
    task = ChainSumTask(n_terms=n_terms, digits=digits)
    for index in range(50):
        problem = task.problem(index, "train")
        terms = [int(t) for t in problem.question.split("+")]
        assert terms == problem.metadata["terms"]
        assert all(len(str(t)) == digits for t in terms)
        assert problem.solution is not None
        assert _check_lines(problem.solution, terms) == sum(terms) == int(problem.answer)
        assert task.extract_answer(problem.solution) == problem.answer


def test_deterministic_and_split_streams_differ() -> None:
    task = ChainSumTask(seed=3)
    again = ChainSumTask(seed=3)
    assert [task.problem(i, "train") for i in range(20)] == [again.problem(i, "train") for i in range(20)]
    train = {task.problem(i, "train").question for i in range(200)}
    heldout = {task.problem(i, "heldout").question for i in range(200)}
    assert not train & heldout
    assert task.problem(0, "train") != ChainSumTask(seed=4).problem(0, "train")
    assert task.num_problems("train") is None


def test_pickle_round_trip() -> None:
    task = ChainSumTask(n_terms=3, digits=2, seed=1)
    clone = pickle.loads(pickle.dumps(task))
    assert clone.problem(5, "heldout") == task.problem(5, "heldout")


@pytest.mark.parametrize(
    ("extracted", "reward"),
    [("2169", 1.0), (" 2169 ", 1.0), ("+2169", 1.0), ("02169", 1.0), ("2168", 0.0), ("2,169", 0.0), ("2169.0", 0.0),
     ("abc", 0.0), ("", 0.0), ("9" * 10_000, 0.0)],
)  # fmt: skip
def test_score(extracted: str, reward: float) -> None:
    problem = Problem(uid="x", question="123+456+789+234+567", answer="2169")
    assert ChainSumTask().score(extracted, problem) == reward


def test_wrong_solutions_are_consistent_and_wrong() -> None:
    task = ChainSumTask()
    rng = random.Random(0)
    for index in range(30):
        problem = task.problem(index, "train")
        wrong = task.wrong_solutions(problem, 4, rng)
        assert len(wrong) == 4
        for solution in wrong:
            lines = solution.split("\n")
            final = int(task.extract_answer(solution) or "")
            assert final != int(problem.answer)
            assert task.score(str(final), problem) == 0.0
            # Exactly one line has a slip; every other line adds correctly, continuing from the line before.
            slips = 0
            partial = problem.metadata["terms"][0]
            for line, term in zip(lines[:-1], problem.metadata["terms"][1:], strict=True):
                left, result = line.split("=")
                a, b = (int(x) for x in left.split("+"))
                assert (a, b) == (partial, term)
                slips += int(result) != a + b
                partial = int(result)
            assert slips == 1
            assert partial == final >= 0


def test_wrong_solutions_are_reproducible() -> None:
    task = ChainSumTask()
    problem = task.problem(7, "train")
    assert task.wrong_solutions(problem, 3, random.Random(1)) == task.wrong_solutions(problem, 3, random.Random(1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_terms": 1}, "chain_sum: n_terms must be >= 2, got 1"), ({"digits": 0}, "chain_sum: digits"),
     ({"digits": 19}, "chain_sum: digits")],
)  # fmt: skip
def test_invalid_arguments_name_the_key(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChainSumTask(**kwargs)


def test_answer_key_is_the_integer() -> None:
    task = ChainSumTask()
    problem = task.problem(0, "train")
    assert task.answer_key("1234", problem) == task.answer_key(" +1234 ", problem) == task.answer_key("01234", problem)
    assert task.answer_key("1234", problem) != task.answer_key("1235", problem)
    assert task.answer_key("-5", problem) != task.answer_key("5", problem)
    # Not an integer: the stripped text, which never equals an integer's key.
    assert task.answer_key("1,234", problem) == task.answer_key(" 1,234", problem) != task.answer_key("1234", problem)
    assert task.answer_key("12 34", problem) != task.answer_key("1234", problem)
