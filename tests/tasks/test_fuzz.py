"""Fuzzing every verifier with random and adversarial model output (docs/algorithm.md §2.6).

A policy under RL writes anything: unbalanced braces, towers of exponents, 100k-character numbers. For
each task the whole path a response takes (the task's answer extraction, then its scorer) must never
raise and must return within a bound; through :class:`Verifier` (worker processes, per-item timeout) the
bound holds whatever the scorer does. Extraction alone is fuzzed in test_extraction.py.
"""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spiral_lit.tasks import ChainSumTask, CountdownTask, MathDatasetTask, Problem, ReasoningGymTask, Task, Verifier

_PIECES = [
    "\\boxed{", "{", "}", "\\", "<answer>", "</answer>", "\\frac{", "\\sqrt{", "^{", "^", "$", "\\left(", "\\right)",
    "[", "]", "(", ")", ",", ".", "-", "+", "*", "/", "=", "e", "1e999", "0", "9", "42", "x", "\\infty", "\\pi",
    "nan", "inf", " ", "\n", "\x00", "é", "\\text{", "\\{", "\\}", "%", "_",
]  # fmt: skip
_RANDOM = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(_PIECES), max_size=200).map("".join),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
)
# Answers a policy could put inside the answer markup: deep nesting, huge numbers, unbalanced, long.
_ADVERSARIAL = [
    "", " ", "{" * 5000, "}" * 5000, "9" * 5000, "-" + "9" * 300, "1e999999", "0/0", "1/0", "nan", "-inf",
    "2^{2^{2^{2^{2^{2^{2^{2}}}}}}}", "10**10**10**10", "\\frac{" * 300 + "1" + "}" * 299, "\\sqrt{" * 300,
    "\\left(" * 300, "[" * 2000, "(((((((((((((((((((((((((((((((1", "{1,2,3" * 500, "x" * 100_000,
    "\\boxed{" * 2000 + "1", "$" * 1000, "\\begin{pmatrix}" * 100, "1," * 20_000, "\\text{" * 200,
]  # fmt: skip
_BOUND_S = {"chain_sum": 0.1, "countdown": 0.1, "reasoning_gym": 1.0, "math": 5.0}
"""Seconds one extract-and-score may take (math-verify's own timeouts are 1 s per parse and per compare)."""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Task, list[Problem]]]:
    data = tmp_path_factory.mktemp("math") / "d.jsonl"
    answers = ["\\frac{1}{2}", "3", "x^2+1", "\\{1,2\\}", "[0,1)", "10^{100}", "\\sqrt{2}"]
    data.write_text("".join(json.dumps({"problem": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    chain = ChainSumTask()
    countdown = CountdownTask()
    gym = ReasoningGymTask(["gcd", "basic_arithmetic", "word_sorting", "letter_counting"], size=20, heldout_size=2)
    math_task = MathDatasetTask(str(data), heldout_size=1)
    return {
        "chain_sum": (chain, [chain.problem(i, "train") for i in range(3)]),
        "countdown": (countdown, [countdown.problem(i, "train") for i in range(3)]),
        "reasoning_gym": (gym, [gym.problem(i, "train") for i in range(8)]),
        "math": (math_task, [math_task.problem(i, "train") for i in range(6)]),
    }


def _responses(answer: str) -> list[str]:
    """The answer bare, in each task's markup, and with the markup cut off."""
    return [answer, f"<answer>{answer}</answer>", f"\\boxed{{{answer}}}", f"<answer>{answer}", f"\\boxed{{{answer}"]


def _check(task: Task, problem: Problem, response: str, bound_s: float) -> None:
    start = time.perf_counter()
    extracted = task.extract_answer(response)
    reward = 0.0 if extracted is None else task.score(extracted, problem)
    elapsed = time.perf_counter() - start
    assert 0.0 <= reward <= 1.0 and not math.isnan(reward), (response[:80], reward)
    assert elapsed < bound_s, (response[:80], elapsed)


@pytest.mark.parametrize("name", ["chain_sum", "countdown", "reasoning_gym", "math"])
def test_adversarial_answers_never_raise_and_are_fast(tasks, name: str) -> None:
    task, problems = tasks[name]
    for answer in _ADVERSARIAL:
        for response in _responses(answer):
            _check(task, problems[len(response) % len(problems)], response, _BOUND_S[name])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=_RANDOM, markup=st.integers(0, 4), which=st.integers(0, 100))
@pytest.mark.parametrize("name", ["chain_sum", "countdown", "reasoning_gym", "math"])
def test_random_answers_never_raise_and_are_fast(tasks, name: str, answer: str, markup: int, which: int) -> None:
    task, problems = tasks[name]
    _check(task, problems[which % len(problems)], _responses(answer)[markup], _BOUND_S[name])


def test_verifier_bounds_every_task_on_adversarial_batches(tasks) -> None:
    """Through worker processes with a timeout, a whole adversarial batch returns in bounded time, rewards in [0, 1]."""
    responses = [r for answer in _ADVERSARIAL for r in _responses(answer)]
    for task, problems in tasks.values():
        batch = [problems[i % len(problems)] for i in range(len(responses))]
        with Verifier(task, timeout_s=2.0, num_workers=2) as verifier:
            start = time.perf_counter()
            result = verifier.score(batch, responses)
            elapsed = time.perf_counter() - start
        assert len(result.rewards) == len(responses)
        assert all(0.0 <= r <= 1.0 for r in result.rewards)
        assert result.n_errors == 0, "a scorer raised on adversarial input"
        # Start-up (at most 120 s, a few in practice) plus every item at its timeout, shared by two workers.
        assert elapsed < 30 + 2.0 * len(responses) / 2
