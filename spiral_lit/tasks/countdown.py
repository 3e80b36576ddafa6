"""Countdown: combine given numbers with ``+ - *`` to hit a target, e.g. ``3 7 9 -> 30``.

Built in for the small-scale reproduction (docs/algorithm.md §8.6) because *checking* a candidate is far
easier than *solving* from scratch: a worked candidate shows the value its expression
reaches, so an aggregator only has to find the one that reaches the target, while a solver
has to search the ~100 ways to combine the numbers. On chain sums a tiny aggregator gained
mostly by re-solving the restated problem; here the candidates carry the information.

Worked solutions write one operation per line, then the expression as the final answer;
any expression that uses every given number exactly once and evaluates to the target
scores 1, whatever its shape, so several answers can be right. They vote as one answer:
:meth:`CountdownTask.answer_key` is the value reached with the multiset of numbers used.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from collections.abc import Hashable

from spiral_lit.tasks.base import Problem, Split, Task

_OPERATORS = ("+", "-", "*")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# Digits, the three operators, parentheses and spaces only, and short: nothing else reaches the parser.
_EXPRESSION = re.compile(r"[0-9+\-*() ]{1,64}")


def _walk(text: str) -> tuple[int, list[int], list[tuple[int, str, int, int]]] | None:
    """(value, numbers used, operations as ``(left, op, right, result)`` in evaluation order) of an integer
    ``+ - *`` expression, or None when it is anything else.

    Parsed with :mod:`ast` and walked by hand (never ``eval``): only integer literals, binary
    ``+ - *`` and parentheses are accepted; unary minus is not (the numbers are given, not negated).
    """
    if _EXPRESSION.fullmatch(text) is None:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    numbers: list[int] = []
    steps: list[tuple[int, str, int, int]] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}

    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            op = ops[type(node.op)]
            steps.append((left, op, right, _APPLY[op](left, right)))
            return steps[-1][3]
        return None

    value = walk(tree.body)
    return None if value is None else (value, numbers, steps)


def evaluate_expression(text: str) -> tuple[int, list[int]] | None:
    """(value, numbers used) of an integer ``+ - *`` expression, or None when it is anything else (:func:`_walk`)."""
    walked = _walk(text)
    return None if walked is None else (walked[0], walked[1])


def expression_steps(text: str) -> list[str] | None:
    """The operations of an expression in the order they are evaluated, one ``a op b = c`` each
    (``(3+5)*7`` -> ``["3+5=8", "8*7=56"]``), or None when :func:`evaluate_expression` refuses it."""
    walked = _walk(text)
    return None if walked is None else _step_lines(walked[2])


def _step_lines(steps: list[tuple[int, str, int, int]]) -> list[str]:
    return [f"{left}{op}{right}={result}" for left, op, right, result in steps]


class CountdownTask(Task):
    """``n_numbers`` numbers in [1, ``max_number``] and a target reachable with ``operators``, each number used once."""

    name = "countdown"

    def __init__(
        self,
        n_numbers: int = 3,
        max_number: int = 9,
        seed: int = 0,
        verdict_steps: bool = False,
        faked_wrong: float = 0.0,
        operators: str = "+-*",
        verdict_target: bool = False,
    ) -> None:
        """
        Args:
            n_numbers: How many numbers each problem gives (2 to 5); the answer uses all of them.
            max_number: Numbers are drawn from 1 to this (2 to 99).
            seed: Base seed; problem ``index`` of ``split`` depends only on (seed, split, index).
            verdict_steps: Candidate verdicts recompute the answer's operations (``3+5=8 8*7=56 wrong``) instead
                of naming the value alone (``56 wrong``), so that an auditor checks the arithmetic step by step
                rather than reading a candidate's last line (docs/algorithm.md §6.3).
            faked_wrong: Fraction of :meth:`wrong_solutions` whose worked lines claim the target with wrong
                arithmetic (``8*7=50``), as an untrained solver writes them; 0 keeps every wrong candidate honest.
            operators: The operators a problem allows, some of ``+-*``; ``+-`` keeps every step's arithmetic to
                small sums and differences, which a tiny model checks reliably (an answer with another operator
                scores 0).
            verdict_target: Candidate verdicts write the problem's target after the value reached (``3+5=8 8*7=56
                make 50 wrong``), so that judging a candidate compares two adjacent numbers instead of the value
                with a target the model must look up far back in the prompt (docs/algorithm.md §6.3).
        """
        if not operators or any(op not in _OPERATORS for op in operators) or len(set(operators)) != len(operators):
            raise ValueError(f"countdown: operators must be distinct characters of '+-*', got {operators!r}")
        if not 0.0 <= faked_wrong <= 1.0:
            raise ValueError(f"countdown: faked_wrong must be between 0 and 1, got {faked_wrong}")
        if not 2 <= n_numbers <= 5:
            raise ValueError(f"countdown: n_numbers must be between 2 and 5, got {n_numbers}")
        if not 2 <= max_number <= 99:
            raise ValueError(f"countdown: max_number must be between 2 and 99, got {max_number}")
        self.n_numbers = n_numbers
        self.max_number = max_number
        self.seed = seed
        self.verdict_steps = verdict_steps
        self.faked_wrong = faked_wrong
        self.operators = tuple(operators)
        self.verdict_target = verdict_target

    def num_problems(self, split: Split) -> int | None:
        """Endless: every index is a new problem."""
        return None

    def problem(self, index: int, split: Split) -> Problem:
        """Problem ``index`` of ``split``: numbers, then a random left-to-right combination of them as the target."""
        if index < 0:
            raise IndexError(f"countdown: index must be >= 0, got {index}")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            order = rng.sample(numbers, len(numbers))
            ops = [rng.choice(self.operators) for _ in range(len(numbers) - 1)]
            target = _left_to_right(order, ops)
            if target > 0:
                break
        return Problem(
            uid=f"{self.name}/{split}/{index}",
            question=f"Use {' '.join(map(str, numbers))} once each with {' '.join(self.operators)} to make {target}.",
            answer=str(target),
            solution=self._worked_solution(order, ops),
            metadata={"numbers": numbers, "target": target},
        )

    def score(self, extracted_answer: str, problem: Problem) -> float:
        """1.0 when the expression uses exactly the given numbers, each once, only the allowed operators, and
        evaluates to the target."""
        walked = _walk(extracted_answer)
        if walked is None:
            return 0.0
        value, used, steps = walked
        if any(op not in self.operators for _, op, _, _ in steps):
            return 0.0
        return float(value == problem.metadata["target"] and sorted(used) == sorted(problem.metadata["numbers"]))

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """``("expr", value, sorted numbers used)`` for a valid expression, else ``("text", answer without spaces)``.

        The score depends on the value and the numbers used alone, so every right answer shares one key, and an
        expression with other numbers never shares a right answer's key (``5*6`` is not ``(1+5)*5``).
        """
        parsed = evaluate_expression(answer)
        if parsed is None:
            return ("text", "".join(answer.split()))
        value, used = parsed
        return ("expr", value, tuple(sorted(used)))

    def candidate_verdict(self, candidate: str, problem: Problem) -> str:
        """The value the candidate's answer reaches and whether it is right: ``"30 right"``, ``"28 wrong"``,
        ``"30 wrong numbers"`` (reaches the target with other numbers), or ``"no answer"``.

        Worked candidates show this value on their last line, so the check is a look, not a search.
        """
        answer = self.extract_answer(candidate)
        walked = None if answer is None else _walk(answer)
        if walked is None:
            return "no answer"
        value, used, steps = walked
        if value != problem.metadata["target"] or any(op not in self.operators for _, op, _, _ in steps):
            status = "wrong"
        else:
            status = "right" if sorted(used) == sorted(problem.metadata["numbers"]) else "wrong numbers"
        reached = _step_lines(steps) if self.verdict_steps else [str(value)]
        target = [f"make {problem.metadata['target']}"] if self.verdict_target else []
        return " ".join([*reached, *target, status])

    def right_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` worked solutions drawn from every left-to-right ordering of the numbers and choice of operators
        that reaches the target (the first operation written either way round when it commutes)."""
        numbers, target = problem.metadata["numbers"], problem.metadata["target"]
        found: dict[str, None] = {}
        for order in itertools.permutations(numbers):
            for ops in itertools.product(self.operators, repeat=len(numbers) - 1):
                if _left_to_right(list(order), list(ops)) == target:
                    found[self._worked_solution(list(order), list(ops))] = None
                    if ops[0] != "-":  # a+b and a*b may be written b+a, b*a
                        swapped = [order[1], order[0], *order[2:]]
                        found[self._worked_solution(swapped, list(ops))] = None
        choices = sorted(found)
        return [rng.choice(choices) for _ in range(n)]

    def wrong_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` worked solutions of combinations that reach some other value than the target.

        A valid combination, the wrong one: with correct arithmetic, or, for a ``faked_wrong`` fraction of them,
        with lines that claim the target anyway (what an untrained solver writes; only checking the arithmetic
        tells them apart).
        """
        numbers, target = problem.metadata["numbers"], problem.metadata["target"]
        out: list[str] = []
        for _ in range(1000 * max(n, 1)):
            if len(out) == n:
                break
            order = rng.sample(numbers, len(numbers))
            ops = [rng.choice(self.operators) for _ in range(len(numbers) - 1)]
            if _left_to_right(order, ops) != target:
                faked = self.faked_wrong > 0 and rng.random() < self.faked_wrong
                out.append(self._worked_solution(order, ops, claim=target if faked else None, rng=rng))
        if len(out) < n:
            raise ValueError(f"countdown: {problem.uid} has no wrong combination (every one reaches {target})")
        return out

    def _worked_solution(
        self, order: list[int], ops: list[str], claim: int | None = None, rng: random.Random | None = None
    ) -> str:
        """One line per operation, then the whole expression (parenthesised left to right) as the answer.

        ``claim``: write this as the last line's result whatever the operation gives, and half the time (``rng``)
        also get an earlier line wrong by a little, carrying the wrong value on: a faked solution.
        """
        lines = []
        value, expression = order[0], str(order[0])
        slip = None
        if claim is not None and rng is not None and len(ops) > 1 and rng.random() < 0.5:
            slip = (rng.randrange(len(ops) - 1), rng.choice([-2, -1, 1, 2]))
        for i, (number, op) in enumerate(zip(order[1:], ops, strict=True)):
            new = _APPLY[op](value, number)
            if claim is not None and i == len(ops) - 1:
                new = claim
            elif slip is not None and i == slip[0]:
                new += slip[1]
            lines.append(f"{value}{op}{number}={new}")
            # Left-to-right evaluation: a product after a sum or difference needs the sum in parentheses.
            if op == "*" and any(c in expression for c in "+-"):
                expression = f"({expression})"
            expression = f"{expression}{op}{number}"
            value = new
        lines.append(self.format_answer(expression))
        return "\n".join(lines)


def _left_to_right(numbers: list[int], ops: list[str]) -> int:
    value = numbers[0]
    for number, op in zip(numbers[1:], ops, strict=True):
        value = _APPLY[op](value, number)
    return value
