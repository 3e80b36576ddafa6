"""A test-only task whose verdicts are pseudo-random but deterministic, for a random tiny model.

A random model never writes a correct chain sum, so every accuracy would be 0. ``VoteTask``
maps each response to one of three answers by a hash of its text and each problem to one of
them as the reference, so accuracies, majority votes, recovery and override are all non-trivial,
yet a single changed token anywhere changes the numbers. Importable by class path
``hash_task.VoteTask`` with ``tests/`` on the path (subprocess tests set PYTHONPATH).
"""

from __future__ import annotations

import dataclasses
import hashlib

from spiral_lit.tasks.base import Problem, Split
from spiral_lit.tasks.chain_sum import ChainSumTask


def _bucket(text: str) -> str:
    return str(hashlib.sha256(text.encode()).digest()[0] % 3)


class VoteTask(ChainSumTask):
    """Chain-sum questions whose reference answer is hash(uid) mod 3; a response's answer is hash(text) mod 3."""

    def problem(self, index: int, split: Split) -> Problem:
        problem = super().problem(index, split)
        return dataclasses.replace(problem, answer=_bucket(problem.uid))

    def extract_answer(self, response: str) -> str | None:
        return _bucket(response)

    def score(self, extracted_answer: str, problem: Problem) -> float:
        return float(extracted_answer == problem.answer)
