"""Model output never reaches a scorer that would run it: code payloads against every registered reasoning-gym
task, through the project's verifier, create nothing; legitimate answers keep their scores."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from spiral_lit.tasks import Problem, ReasoningGymTask, Verifier
from spiral_lit.tasks.answer_guard import GRAMMARS, conforms

PAYLOADS = [
    "__import__('os').system('touch {f}')",
    "[__import__('os').system('touch {f}')]",
    "(__import__('os').system('touch {f}'))+1",
    "x + __import__('os').system('touch {f}')",
    "open('{f}', 'w').write('1')",
    "[[open('{f}', 'w')]]",
]


@pytest.fixture(scope="module")
def every_task() -> tuple[ReasoningGymTask, dict[str, Problem]]:
    """One mixture of every registered task (but ``composite``, which needs its own config) and a problem of each."""
    from reasoning_gym.factory import DATASETS

    names = sorted(name for name in DATASETS if name != "composite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ReasoningGymTask(names, size=5000, heldout_size=1)
        problems: dict[str, Problem] = {}
        index = 0
        while len(problems) < len(names):
            problem = task.problem(index, "train")
            problems.setdefault(problem.metadata["task"], problem)
            index += 1
    return task, problems


def _payload_batch(problems: dict[str, Problem], directory: Path) -> tuple[list[Problem], list[str], list[Path]]:
    batch, responses, targets = [], [], []
    for name, problem in problems.items():
        for k, payload in enumerate(PAYLOADS):
            target = directory / f"{name}_{k}"
            batch.append(problem)
            responses.append(f"<answer>{payload.format(f=target)}</answer>")
            targets.append(target)
    return batch, responses, targets


@pytest.mark.parametrize("num_workers", [0, 1], ids=["inline_grammar_only", "sandboxed_workers"])
def test_code_payloads_never_run(every_task, num_workers: int, tmp_path: Path) -> None:
    task, problems = every_task
    batch, responses, targets = _payload_batch(problems, tmp_path)
    with Verifier(task, timeout_s=30.0, num_workers=num_workers) as verifier:
        result = verifier.score(batch, responses)
    ran = sorted({t.name.rsplit("_", 1)[0] for t in targets if t.exists()})
    assert ran == [], f"payloads ran in the scorers of: {ran}"
    # Every payload sent to a task whose scorer evaluates answers was refused before it got there.
    guarded = sum(p.metadata["task"] in GRAMMARS for p in batch)
    assert result.n_rejected == guarded > 0


def test_correct_answers_score_the_same_with_and_without_the_sandbox(every_task) -> None:
    task, problems = every_task
    batch = list(problems.values())
    responses = [f"<answer>{p.answer}</answer>" for p in batch]
    results = []
    for sandbox in (False, True):
        with Verifier(task, timeout_s=30.0, num_workers=1, sandbox=sandbox) as verifier:
            results.append(verifier.score(batch, responses))
    assert results[1].rewards == results[0].rewards
    assert sum(results[1].rewards) > 0.9 * len(batch)
    assert (results[1].n_rejected, results[1].n_errors, results[1].n_timeouts) == (0, 0, 0)


@pytest.mark.parametrize(
    ("name", "answer", "entry"),
    [
        ("countdown", "94*4 - 61 - 6", {}),
        ("puzzle24", "10*(8 - 5) - 6", {}),
        ("polynomial_multiplication", "-896*x**4 + 2240*x**3 + 3584*x", {"metadata": {"variables": ["x"]}}),
        ("simple_integration", "-34*x**8/15 - 5*x/4 + C", {"metadata": {"variable": "x"}}),
        ("intermediate_integration", "-4*(-2*x - 8)**(3/2)/3 + exp(x)*sin(x) + C", {"metadata": {"variable": "x"}}),
        ("binary_matrix", "[[0, 1], [1, 2]]", {}),
        ("spiral_matrix", "[1, -2, 3]", {}),
        ("string_insertion", "['A', 'B', \"C\"]", {}),
        ("n_queens", "[['_', 'Q'], ['Q', '_']]", {}),
    ],
)
def test_grammars_accept_the_tasks_answer_forms(name: str, answer: str, entry: dict) -> None:
    assert conforms(name, answer, entry)


@pytest.mark.parametrize(
    ("name", "answer", "entry"),
    [
        ("countdown", "2**10", {}),  # no powers in countdown
        ("countdown", "a + 1", {}),
        ("puzzle24", "1 .real", {}),
        ("polynomial_multiplication", "y**2", {"metadata": {"variables": ["x"]}}),
        ("simple_integration", "exec(x) + C", {"metadata": {"variable": "x"}}),
        ("intermediate_integration", "x.__class__", {"metadata": {"variable": "x"}}),
        ("binary_matrix", "[[0, 1]] + list()", {}),
        ("string_insertion", "print('A')", {}),
        ("n_queens", "[x for x in '_Q']", {}),
        ("countdown", "1+" * 2000 + "1", {}),  # over the length bound
    ],
)
def test_grammars_refuse_anything_else(name: str, answer: str, entry: dict) -> None:
    assert not conforms(name, answer, entry)


def test_tasks_without_evaluating_scorers_are_not_restricted() -> None:
    assert conforms("gcd", "__import__('os')", {})
