"""A test-only task whose scorer fails in every way a verifier must survive (docs/algorithm.md §2.6).

Kept in its own light module (like ``hash_task``): verifier workers unpickle the task and import its
module, and a test module would drag Lightning into every restarted worker.
"""

from __future__ import annotations

import time

from hash_task import VoteTask, _bucket

from spiral_lit.tasks.base import Problem


class FaultyVoteTask(VoteTask):
    """``VoteTask`` whose answer bucket decides the fault: 0 makes the scorer raise, 1 makes it hang, 2 has no
    parseable answer at all."""

    def extract_answer(self, response: str) -> str | None:
        bucket = _bucket(response)
        return None if bucket == "2" else bucket

    def score(self, extracted_answer: str, problem: Problem) -> float:
        if extracted_answer == "0":
            raise RuntimeError("scorer bug")
        time.sleep(3600)
        return 1.0
