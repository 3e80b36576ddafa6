"""Evaluation metrics of method.md section 6: pass@k and majority vote.

This part holds pure functions on Python numbers and answer strings; stateful
torchmetrics wrappers (accumulating over an evaluation epoch) build on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (section 6).

    pass@k = 1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement
    from the n include a correct one. Evaluated in the product form
    1 - prod_{i = n-c+1}^{n} (1 - k / i) (Chen et al. 2021), which stays finite and accurate
    for n in the thousands where the binomials overflow floats.
    """
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 0, c >= 0 and k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n (k samples are drawn from the n); got n={n}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k needs c <= n (correct samples are among the n); got n={n}, c={c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer (maj@n, section 6); None if every answer is None.

    Tie rule: among answers with the top count, the one that appeared FIRST in ``answers``
    wins, so the vote is deterministic given the order of the traces.
    """
    counts: dict[str, int] = {}  # insertion order = order of first appearance
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None
    # max() returns the first maximal key in iteration order, i.e. the earliest answer.
    return max(counts, key=counts.__getitem__)


def majority_vote_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority-voted answer is correct: the correctness of the first trace that gave it.

    False when no trace has an answer. ``correct[i]`` is the verifier's verdict on ``answers[i]``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) must have the same length")
    voted = majority_vote(answers)
    if voted is None:
        return False
    return bool(correct[list(answers).index(voted)])
