"""The built-in star-path task: graphs, worked solutions, scoring, answer keys, verdicts and wrong candidates."""

from __future__ import annotations

import pickle
import random

import pytest

from spiral_lit.errors import UserError
from spiral_lit.tasks import Problem, StarPathTask
from spiral_lit.tasks.star_path import parse_path

# Centre c, arms c>a>b and c>d>e; the goal is e.
_HAND = Problem(
    uid="star_path/hand/0",
    question="Edges:\nc>a,a>b,c>d,d>e\nFind the path start=c goal=e.",
    answer="c>d>e",
    metadata={"centre": "c", "goal": "e", "arms": ["ab", "de"]},
)


def _edges(problem: Problem) -> set[tuple[str, str]]:
    listed = problem.question.split("\n")[1].split(",")
    return {(e[0], e[2]) for e in listed}


def test_graph_is_a_star_with_the_goal_at_a_leaf() -> None:
    task = StarPathTask(n_arms=4, arm_length=3)
    for i in range(50):
        problem = task.problem(i, "train")
        edges = _edges(problem)
        centre, goal = problem.metadata["centre"], problem.metadata["goal"]
        assert len(edges) == 12
        assert sum(a == centre for a, _ in edges) == 4  # the only branching node
        assert all(sum(a == node for a, _ in edges) <= 1 for node, _ in edges if node != centre)
        assert not any(a == goal for a, _ in edges)  # a leaf
        assert problem.question.endswith(f"start={centre} goal={goal}.")
        path = problem.answer.split(">")
        assert path[0] == centre and path[-1] == goal and len(path) == 4
        assert all(hop in edges for hop in zip(path, path[1:], strict=False))


def test_problems_are_deterministic_and_splits_differ() -> None:
    task = StarPathTask()
    assert task.problem(7, "train") == StarPathTask().problem(7, "train")
    assert task.problem(7, "train").question != task.problem(7, "heldout").question
    assert task.problem(7, "train").question != StarPathTask(seed=1).problem(7, "train").question
    assert task.num_problems("train") is None


def test_worked_solution_writes_one_edge_per_line_then_the_path() -> None:
    task = StarPathTask(n_arms=3, arm_length=2)
    problem = task.problem(0, "train")
    assert problem.solution is not None
    *lines, last = problem.solution.split("\n")
    path = problem.answer.split(">")
    assert lines == [f"{a}>{b}" for a, b in zip(path, path[1:], strict=False)]
    assert last == f"<answer>{problem.answer}</answer>"
    assert task.extract_answer(problem.solution) == problem.answer


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("c>d>e", 1.0),
        (" c>d>e ", 1.0),
        ("c>a>b", 0.0),  # another leaf
        ("c>a>e", 0.0),  # a>e is no edge
        ("c>e", 0.0),  # skips d
        ("d>e", 0.0),  # not from the centre
        ("c d e", 0.0),
        ("c>d>e>", 0.0),
        ("", 0.0),
        ("__import__('os')", 0.0),
    ],
)
def test_score_hand_computed(answer: str, score: float) -> None:
    assert StarPathTask().score(answer, _HAND) == score


def test_parse_path_refuses_anything_but_letters_joined_by_arrows() -> None:
    assert parse_path(" q>w>e ") == ["q", "w", "e"]
    assert parse_path("q") == ["q"]
    for text in ["Q>w", "q>>w", "q>w\n>e", "1>2", "q>" * 70 + "q"]:
        assert parse_path(text) is None, text


def test_answer_key_is_the_path() -> None:
    task = StarPathTask()
    assert task.answer_key("c>d>e", _HAND) == task.answer_key(" c>d>e", _HAND) == ("path", ("c", "d", "e"))
    assert task.answer_key("c>a>b", _HAND) != task.answer_key("c>d>e", _HAND)
    assert task.answer_key("c d e", _HAND) == ("text", "cde")


@pytest.mark.parametrize(
    ("candidate", "verdict"),
    [
        ("c>d\nd>e\n<answer>c>d>e</answer>", "end=e right"),
        ("c>a\na>b\n<answer>c>a>b</answer>", "end=b wrong"),
        ("c>a\na>e\n<answer>c>a>e</answer>", "a>e missing"),
        ("<answer>a>b</answer>", "start=a wrong"),
        ("c>d\nd>e", "no answer"),
        ("<answer>c, d, e</answer>", "no answer"),
    ],
)
def test_candidate_verdict_hand_computed(candidate: str, verdict: str) -> None:
    assert StarPathTask().candidate_verdict(candidate, _HAND) == verdict


def test_wrong_solutions_follow_other_arms_or_fake_the_last_edge() -> None:
    task = StarPathTask(n_arms=4, arm_length=3)
    faking = StarPathTask(n_arms=4, arm_length=3, faked_wrong=1.0)
    problem = task.problem(3, "train")
    goal = problem.metadata["goal"]
    for wrong in task.wrong_solutions(problem, 20, random.Random(0)):
        assert task.score(task.extract_answer(wrong) or "", problem) == 0.0
        assert task.candidate_verdict(wrong, problem).endswith(" wrong")
        assert not task.candidate_verdict(wrong, problem).startswith(f"end={goal}")
    for faked in faking.wrong_solutions(problem, 20, random.Random(0)):
        answer = faking.extract_answer(faked) or ""
        assert answer.endswith(f">{goal}") and faking.score(answer, problem) == 0.0
        assert faking.candidate_verdict(faked, problem).endswith(" missing")


def test_bad_settings_are_refused() -> None:
    for kwargs in [{"n_arms": 1}, {"arm_length": 0}, {"n_arms": 9, "arm_length": 3}, {"faked_wrong": 1.5}]:
        with pytest.raises(UserError):
            StarPathTask(**kwargs)  # type: ignore[arg-type]


def test_task_pickles_for_verifier_workers() -> None:
    task = StarPathTask(n_arms=3)
    clone = pickle.loads(pickle.dumps(task))
    problem = task.problem(1, "heldout")
    assert clone.score(problem.answer, problem) == 1.0
