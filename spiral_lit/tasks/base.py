"""The task interface: what a problem is and how an answer to it is scored.

A task knows nothing of models or Lightning. It hands out problems by index (so the
data stream is deterministic, shardable and resumable) and scores an already
extracted final answer. Scoring may be slow or hang on adversarial input, so it is
run through :class:`spiral_lit.tasks.verify.Verifier`, never called directly in the
training loop.

Answers are compared (majority vote, RSA's vote, distinct answers per set, copy rates) by their
:meth:`Task.answer_key`, not as raw strings: in countdown ``(1+5)*5`` and ``5*(1+5)`` are one answer,
and a policy that writes it in several ways must not lose votes for it (docs/algorithm.md §7.2).
"""

from __future__ import annotations

import abc
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "heldout"]


class UnsafeAnswer(ValueError):
    """Raised by ``Task.score`` for an answer that its scorer must not see (it could run as code).

    The verifier scores it 0 and counts it as rejected, apart from scorer errors.
    """


@dataclass(frozen=True)
class Problem:
    """One problem, as the prompts and the verifier see it."""

    uid: str
    """Stable identifier, e.g. ``chain_sum/train/17``; unique within a task."""
    question: str
    """The problem text shown to the model."""
    answer: str
    """The reference final answer."""
    solution: str | None = None
    """A worked step-by-step solution ending in the formatted final answer (for SFT), if known."""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    """Source-specific data the scorer needs (JSON-serialisable)."""


class Task(abc.ABC):
    """A source of problems with a verifier."""

    name: str
    answer_format: Literal["answer_tag", "boxed"] = "answer_tag"

    @property
    def answer_instruction(self) -> str:
        """The sentence the prompt uses to ask for the final answer in the format this task extracts."""
        from spiral_lit.tasks.extraction import answer_instruction

        return answer_instruction(self.answer_format)

    def format_answer(self, answer: str) -> str:
        """The final answer written the way the prompt asks for it (for worked solutions)."""
        from spiral_lit.tasks.extraction import format_answer

        return format_answer(answer, self.answer_format)

    def extract_answer(self, response: str) -> str | None:
        """The final answer in a model response, or None when it has none."""
        from spiral_lit.tasks.extraction import extract_answer

        return extract_answer(response, self.answer_format)

    @abc.abstractmethod
    def num_problems(self, split: Split) -> int | None:
        """How many problems the split holds; None for an endless procedural stream."""

    @abc.abstractmethod
    def problem(self, index: int, split: Split) -> Problem:
        """The problem at ``index`` of ``split``; the same index always gives the same problem."""

    @abc.abstractmethod
    def score(self, extracted_answer: str, problem: Problem) -> float:
        """Reward in [0, 1] of an extracted answer. Pure, picklable; runs in a verifier worker.

        The answer is model output, i.e. hostile input: a scorer that parses it with ``eval``-like code
        must check it against a strict grammar first and raise :class:`UnsafeAnswer` otherwise.
        """

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """A canonical form of an extracted answer: answers with equal keys count as one answer wherever answers
        are compared (majority vote, RSA's vote, distinct answers, copy rates); the vote's winner is still the
        first answer string with the winning key, so scoring is unchanged.

        Answers with equal keys should get the same score on ``problem``: a key may split answers the scorer
        treats alike, and should join only answers that differ in form (spacing, ``0.5`` and ``1/2``). Runs in
        the trainer process, not in a verifier worker, on hostile model output: it must be fast and bounded,
        and must never evaluate the answer as code. The default is the stripped string; the built-in tasks
        override it (countdown: the value and the numbers used; chain sums: the integer; math: math-verify's
        parse; reasoning-gym: the text with whitespace runs collapsed).
        """
        return answer.strip()

    def candidate_verdict(self, candidate: str, problem: Problem) -> str:
        """A short verdict on one candidate worked solution, from what the candidate itself shows.

        Used by the auditing aggregation warm start (``prompts.aggregation_target: audit``,
        docs/algorithm.md §6.3): the target first states one verdict per shown candidate, then the solution. A
        verdict must be what a reader can check in the candidate's text (a value reached, a line that does not
        add up), not the reference answer, so the aggregator learns to audit rather than to re-solve. Its last
        word is ``right`` exactly when the candidate is right (evaluation reads audits that way). Tasks without
        such a check keep this default.
        """
        raise NotImplementedError(
            f"task {self.name!r} has no candidate verdicts, so it cannot build auditing aggregation targets; use "
            "prompts.aggregation_target: solution, or a task that checks candidates (countdown, chain_sum)"
        )

    def right_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` correct worked solutions, for the right candidates of aggregation warm-start data.

        Tasks where several solutions are right return different ones, so that an auditing target which copies a
        kept candidate (docs/algorithm.md §6.3) can only be fitted by copying it, not by re-solving. The default
        repeats the reference solution.
        """
        if problem.solution is None:
            raise ValueError(f"task {self.name!r}: problem {problem.uid} has no worked solution")
        return [problem.solution] * n

    def wrong_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` plausible but wrong worked solutions, for aggregation warm-start data.

        Only tasks with worked solutions can build them; the default says so.
        """
        raise NotImplementedError(
            f"task {self.name!r} cannot build wrong candidate solutions; aggregation warm start needs a task "
            "with worked solutions (e.g. the built-in chain_sum task)"
        )


def has_verdicts(task: Task) -> bool:
    """Whether ``task`` writes candidate verdicts (overrides :meth:`Task.candidate_verdict`)."""
    return type(task).candidate_verdict is not Task.candidate_verdict


def answer_keys(task: Task, problems: Sequence[Problem], answers: Sequence[str | None]) -> list[Hashable | None]:
    """``task.answer_key`` of every answer (None, no answer, stays None); ``answers`` holds the same number of
    answers per problem, problem-major. Each distinct (problem, answer) is keyed once."""
    if (problems and len(answers) % len(problems)) or (not problems and answers):
        raise ValueError(f"{len(answers)} answers do not split evenly over {len(problems)} problems")
    per_problem = len(answers) // len(problems) if problems else 0
    cache: dict[tuple[int, str], Hashable] = {}
    keys: list[Hashable | None] = []
    for i, answer in enumerate(answers):
        if answer is None:
            keys.append(None)
            continue
        b = i // per_problem
        if (b, answer) not in cache:
            cache[b, answer] = task.answer_key(answer, problems[b])
        keys.append(cache[b, answer])
    return keys
