"""Star paths: find the path from the centre of a star graph to one of its leaves, e.g. ``start=q goal=z``.

Built in as the quickstart's task because *checking* a candidate is far cheaper than *solving*
(docs/algorithm.md §8.6). The graph is a centre with ``n_arms`` chains of ``arm_length`` nodes, its edges listed
in a random order. Solving means choosing, at the centre, the one arm that leads to the goal: a solver that
writes the path forward has to look ahead along every arm before its first step, which a model trained to
predict the next token does not learn (it guesses an arm, and is right about one time in ``n_arms``: Bachmann
and Nagarajan, "The pitfalls of next-token prediction", 2024). Checking a written path means reading its last
node and comparing it with the goal. Parallel samples then hold the answer far more often than any one of them
does, and only an aggregator that checks them can use that: majority vote cannot tell a right path from a
wrong one when each is written once.

Nodes are single lowercase letters written without spaces (``q>w``), so that every node is one token of the
quickstart's tokenizer wherever it appears. A worked solution writes one edge per line along the right arm,
then the path as the final answer (``q>w>e>r``). The right path is unique, so an answer's key is the path.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Hashable

from spiral_lit.errors import UserError
from spiral_lit.tasks.base import Problem, Split, Task

_NODES = string.ascii_lowercase
# Letters joined by '>', bounded in length: nothing else is parsed as a path.
_PATH = re.compile(r"[a-z](?:>[a-z]){0,63}")


def parse_path(text: str) -> list[str] | None:
    """The nodes of a path written ``a>b>c`` (spaces around it ignored), or None when it is anything else."""
    text = text.strip()
    return text.split(">") if _PATH.fullmatch(text) else None


class StarPathTask(Task):
    """A centre, ``n_arms`` arms of ``arm_length`` nodes each; the answer is the path from the centre to a leaf."""

    name = "star_path"

    def __init__(self, n_arms: int = 4, arm_length: int = 3, seed: int = 0, faked_wrong: float = 0.0) -> None:
        """
        Args:
            n_arms: Arms leaving the centre (2 or more); a solver that guesses an arm is right 1 / n_arms of the time.
            arm_length: Nodes on each arm after the centre (1 or more); the goal is the last node of one arm.
            seed: Base seed; problem ``index`` of ``split`` depends only on (seed, split, index).
            faked_wrong: Fraction of :meth:`wrong_solutions` that follow a wrong arm and then claim the goal with an
                edge that does not exist, as a solver that knows where it must end writes them; 0 keeps every wrong
                candidate an honest path to another leaf.
        """
        if n_arms < 2:
            raise UserError(f"star_path: n_arms must be >= 2, got {n_arms}")
        if arm_length < 1:
            raise UserError(f"star_path: arm_length must be >= 1, got {arm_length}")
        if n_arms * arm_length + 1 > len(_NODES):
            raise UserError(
                f"star_path: n_arms * arm_length + 1 = {n_arms * arm_length + 1} nodes, more than the "
                f"{len(_NODES)} letters that name them"
            )
        if not 0.0 <= faked_wrong <= 1.0:
            raise UserError(f"star_path: faked_wrong must be between 0 and 1, got {faked_wrong}")
        self.n_arms = n_arms
        self.arm_length = arm_length
        self.seed = seed
        self.faked_wrong = faked_wrong

    def num_problems(self, split: Split) -> int | None:
        """Endless: every index is a new graph."""
        return None

    def problem(self, index: int, split: Split) -> Problem:
        """Problem ``index`` of ``split``: random node names, arms, edge order and goal arm."""
        if index < 0:
            raise IndexError(f"star_path: index must be >= 0, got {index}")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        nodes = rng.sample(_NODES, self.n_arms * self.arm_length + 1)
        centre = nodes[0]
        arms = [nodes[1 + a * self.arm_length : 1 + (a + 1) * self.arm_length] for a in range(self.n_arms)]
        edges = [f"{a}>{b}" for arm in arms for a, b in zip([centre, *arm[:-1]], arm, strict=True)]
        rng.shuffle(edges)
        goal_arm = rng.randrange(self.n_arms)
        goal = arms[goal_arm][-1]
        path = [centre, *arms[goal_arm]]
        return Problem(
            uid=f"{self.name}/{split}/{index}",
            question=f"Edges:\n{','.join(edges)}\nFind the path start={centre} goal={goal}.",
            answer=">".join(path),
            solution=self._worked_solution(path),
            metadata={"centre": centre, "goal": goal, "arms": ["".join(arm) for arm in arms]},
        )

    def _edges(self, problem: Problem) -> set[tuple[str, str]]:
        centre = problem.metadata["centre"]
        return {(a, b) for arm in problem.metadata["arms"] for a, b in zip(centre + arm[:-1], arm, strict=True)}

    def score(self, extracted_answer: str, problem: Problem) -> float:
        """1.0 when the answer walks existing edges from the centre to the goal (the unique right path)."""
        path = parse_path(extracted_answer)
        if path is None or path[0] != problem.metadata["centre"] or path[-1] != problem.metadata["goal"]:
            return 0.0
        edges = self._edges(problem)
        return float(all((a, b) in edges for a, b in zip(path, path[1:], strict=False)))

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """``("path", nodes)`` for a path, else ``("text", answer without spaces)``: one right path, one key."""
        path = parse_path(answer)
        return ("text", "".join(answer.split())) if path is None else ("path", tuple(path))

    def candidate_verdict(self, candidate: str, problem: Problem) -> str:
        """What a reader sees by checking the candidate's path: its end against the goal (``end=r right``,
        ``end=k wrong``), or its first edge that the graph does not have (``k>z missing``), or ``no answer``.

        Reading a path's last node and looking up its edges is a look, not a search.
        """
        answer = self.extract_answer(candidate)
        path = None if answer is None else parse_path(answer)
        if path is None:
            return "no answer"
        edges = self._edges(problem)
        for a, b in zip(path, path[1:], strict=False):
            if (a, b) not in edges:
                return f"{a}>{b} missing"
        if path[0] != problem.metadata["centre"]:
            return f"start={path[0]} wrong"
        return f"end={path[-1]} {'right' if path[-1] == problem.metadata['goal'] else 'wrong'}"

    def wrong_solutions(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """``n`` worked solutions along arms that do not lead to the goal: honest paths to another leaf, or, for a
        ``faked_wrong`` fraction, the same walk with its last node replaced by the goal (an edge that is missing)."""
        centre, goal = problem.metadata["centre"], problem.metadata["goal"]
        others = [arm for arm in problem.metadata["arms"] if arm[-1] != goal]
        out = []
        for _ in range(n):
            path = [centre, *rng.choice(others)]
            if self.faked_wrong > 0 and rng.random() < self.faked_wrong:
                path[-1] = goal
            out.append(self._worked_solution(path))
        return out

    def _worked_solution(self, path: list[str]) -> str:
        """One edge per line, then the path as the final answer."""
        lines = [f"{a}>{b}" for a, b in zip(path, path[1:], strict=False)]
        return "\n".join([*lines, self.format_answer(">".join(path))])
