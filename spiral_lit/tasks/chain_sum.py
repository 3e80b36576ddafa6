"""The built-in procedural task: chain sums such as ``123+456+789+234+567``.

Small enough for a ~2M-parameter model to learn on CPU in minutes, yet long enough
(one carry-prone partial sum per line) that sampling several solutions and aggregating
them helps. Worked solutions write one partial sum per line, so warm-start SFT can teach
the format, and :meth:`ChainSumTask.wrong_solutions` can build plausible wrong
candidates (one arithmetic slip, propagated consistently) for aggregation warm start.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable

from spiral_lit.tasks.base import Problem, Split, Task

# An optional sign and digits, with surrounding whitespace; nothing else (no commas, no
# decimals) so the reward cannot be gamed by formatting. The length cap keeps int() away
# from Python's 4300-digit conversion limit.
_INTEGER = re.compile(r"\s*([+-]?\d{1,200})\s*")
_LINE = re.compile(r"(\d{1,200})\+(\d{1,200})=(-?\d{1,200})")


class ChainSumTask(Task):
    """Sums of ``n_terms`` random ``digits``-digit integers; the answer is the integer sum."""

    name = "chain_sum"

    def __init__(self, n_terms: int = 5, digits: int = 3, seed: int = 0) -> None:
        """
        Args:
            n_terms: How many integers each problem adds up (at least 2).
            digits: How many digits each integer has (1 to 18).
            seed: Base seed; problem ``index`` of ``split`` depends only on (seed, split, index).
        """
        if n_terms < 2:
            raise ValueError(f"chain_sum: n_terms must be >= 2, got {n_terms}")
        if not 1 <= digits <= 18:
            raise ValueError(f"chain_sum: digits must be between 1 and 18, got {digits}")
        self.n_terms = n_terms
        self.digits = digits
        self.seed = seed

    def num_problems(self, split: Split) -> int | None:
        """Endless: every index is a new problem."""
        return None

    def problem(self, index: int, split: Split) -> Problem:
        """Problem ``index`` of ``split``, from a generator seeded by (seed, split, index) alone."""
        if index < 0:
            raise IndexError(f"chain_sum: index must be >= 0, got {index}")
        # A string seed hashes the whole tuple, so train and heldout are independent streams.
        rng = random.Random(f"{self.seed}/{split}/{index}")
        terms = [rng.randint(10 ** (self.digits - 1), 10**self.digits - 1) for _ in range(self.n_terms)]
        total = sum(terms)
        return Problem(
            uid=f"{self.name}/{split}/{index}",
            question="+".join(str(t) for t in terms),
            answer=str(total),
            solution=self._worked_solution(terms, error_step=None, error=0),
            metadata={"terms": terms},
        )

    def score(self, extracted_answer: str, problem: Problem) -> float:
        """1.0 when the answer is the same integer (whitespace and a leading ``+`` allowed), else 0.0."""
        match = _INTEGER.fullmatch(extracted_answer)
        if match is None:
            return 0.0
        return float(int(match.group(1)) == int(problem.answer))

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """The integer the answer writes (``+1234``, ``01234`` and ``1234`` are one answer), else the stripped text."""
        match = _INTEGER.fullmatch(answer)
        return answer.strip() if match is None else int(match.group(1))

    def candidate_verdict(self, candidate: str, problem: Problem) -> str:
        """``"right"`` when every ``a+b=c`` line adds up and uses the problem's terms in order, else the first line
        that does not (``"line 3 wrong"``), or ``"no answer"`` when the candidate has no final answer.

        Each line is checked on its own (one addition), which is cheaper than re-adding the whole chain.
        """
        if self.extract_answer(candidate) is None:
            return "no answer"
        terms = problem.metadata["terms"]
        sums = [[int(x) for x in m.groups()] for line in candidate.splitlines() if (m := _LINE.fullmatch(line.strip()))]
        partial = terms[0]
        for number, term in enumerate(terms[1:], start=1):
            if number > len(sums):
                return f"line {number} missing"
            a, b, c = sums[number - 1]
            if a != partial or b != term or a + b != c:
                return f"line {number} wrong"
            partial = c
        return "right"

    def wrong_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` worked solutions with one slip at a random step, carried through so every later line is right.

        The slip is an off-by-a-little, a changed digit, or a dropped/extra carry (a power of ten); because
        later lines add correctly to the wrong partial sum, the final answer is wrong by exactly the slip.
        """
        terms = list(problem.metadata["terms"])
        return [self._one_wrong_solution(terms, rng) for _ in range(n)]

    def _one_wrong_solution(self, terms: list[int], rng: random.Random) -> str:
        """One solution with a single slip at a random line."""
        step = rng.randrange(len(terms) - 1)
        correct = sum(terms[: step + 2])
        while True:
            wrong = _slip(correct, rng)
            if wrong != correct and wrong >= 0:
                return self._worked_solution(terms, error_step=step, error=wrong - correct)

    def _worked_solution(self, terms: list[int], error_step: int | None, error: int) -> str:
        """One line per partial sum; ``error`` is added to line ``error_step`` and to every line after it."""
        lines = []
        partial = terms[0]
        for step, term in enumerate(terms[1:]):
            new = partial + term
            if step == error_step:
                new += error
            lines.append(f"{partial}+{term}={new}")
            partial = new
        lines.append(self.format_answer(str(partial)))
        return "\n".join(lines)


def _slip(value: int, rng: random.Random) -> int:
    """``value`` with one typical arithmetic slip; may return ``value`` itself or a negative (caller retries)."""
    kind = rng.choice(("off_by", "digit", "carry"))
    if kind == "off_by":
        return value + rng.choice((-1, 1)) * rng.randint(1, 9)
    text = str(value)
    if kind == "digit":
        position = rng.randrange(len(text))
        # A leading zero would change the length of the number, which no one writes by mistake.
        choices = [d for d in "0123456789" if d != text[position] and not (position == 0 and d == "0")]
        return int(text[:position] + rng.choice(choices) + text[position + 1 :])
    # A forgotten or doubled carry changes the sum by a power of ten above the units.
    return value + rng.choice((-1, 1)) * 10 ** rng.randint(1, len(text))
