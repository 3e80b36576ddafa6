"""Evaluation metrics of docs/algorithm.md §7: pass@k, majority vote, aggregation diagnostics and paired intervals.

Pure functions on Python numbers, answers and tensors. Answers are compared by a key, never a task: a
``key`` function (``Callable[[A], Hashable]``) where the vote must return an answer, or answer keys
(:meth:`spiral_lit.tasks.base.Task.answer_key`) in place of the answers. Evaluation turns them into
per-problem values that :func:`spiral_lit.runtime.policy.log_eval_metrics` accumulates with
torchmetrics (so several ranks sum correctly); training logs their step means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
A = TypeVar("A", bound=Hashable)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (docs/algorithm.md §7.2).

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


def _identity(answer: A) -> Hashable:
    return answer


def majority_index(answers: Sequence[A | None], key: Callable[[A], Hashable] = _identity) -> int | None:
    """The position of the majority-voted answer (maj@n, docs/algorithm.md §7.2); None if every answer is None.

    Answers vote by ``key(answer)`` (e.g. countdown's ``(1+5)*5`` and ``5*(1+5)`` are one vote); the winner
    is the first answer whose key got the most votes. Tie rule: among keys with the top count, the one that
    appeared FIRST in ``answers`` wins, so the vote is deterministic given the order of the traces.
    """
    counts: dict[Hashable, int] = {}  # insertion order = order of first appearance
    first: dict[Hashable, int] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            k = key(answer)
            counts[k] = counts.get(k, 0) + 1
            first.setdefault(k, i)
    if not counts:
        return None
    # max() returns the first maximal key in iteration order, i.e. the earliest one.
    return first[max(counts, key=counts.__getitem__)]


def majority_vote(answers: Sequence[A | None], key: Callable[[A], Hashable] = _identity) -> A | None:
    """The majority-voted answer itself (:func:`majority_index`): an answer of ``answers``, or None."""
    index = majority_index(answers, key)
    return None if index is None else answers[index]


def majority_vote_correct(
    answers: Sequence[A | None], correct: Sequence[bool], key: Callable[[A], Hashable] = _identity
) -> bool:
    """Whether the majority-voted answer is correct: the correctness of the first trace that gave it.

    False when no trace has an answer. ``correct[i]`` is the verifier's verdict on ``answers[i]``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) must have the same length")
    index = majority_index(answers, key)
    return index is not None and bool(correct[index])


def gather_sets(per_trace_BN: Sequence[Sequence[T]], sets_BKS: torch.Tensor) -> list[list[list[T]]]:
    """The members of every set, ``[B][K][S]``: ``per_trace_BN[b][sets_BKS[b, k, s]]``."""
    return [[[per_trace_BN[b][int(i)] for i in set_S] for set_S in sets_KS] for b, sets_KS in enumerate(sets_BKS)]


def set_diagnostics(
    answers_BKS: Sequence[Sequence[Sequence[Hashable | None]]],
    candidate_correct_BKS: torch.Tensor,
    aggregation_correct_BKA: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What aggregation does with each set: float tensors ``[B, K]`` (docs/algorithm.md §7.4).

    Args:
        answers_BKS: the candidates' answer keys (:meth:`~spiral_lit.tasks.base.Task.answer_key` of the
            extracted final answers, so equivalent answers vote and count as one; None = none found).
        candidate_correct_BKS: [B, K, S] bool, the verifier's verdict on each candidate.
        aggregation_correct_BKA: [B, K, A] bool, the verdict on each of the set's A aggregation traces.

    Returns:
        ``set_oracle``: 1 when some candidate is correct (the ceiling of an aggregator that only picks);
        ``set_majority``: 1 when the set's majority-voted answer is correct (:func:`majority_vote_correct`);
        ``accuracy``: the fraction of the set's aggregations that are correct;
        ``recovery``: that fraction where the majority is wrong (NaN where it is right);
        ``override``: the fraction of wrong aggregations where the majority is right (NaN where it is wrong);
        ``distinct_answers``: distinct final answers among the candidates (unparsed ones not counted).
        A mean that skips NaNs turns recovery and override into rates over the sets where they are defined.
    """
    B, K, S = candidate_correct_BKS.shape
    if len(answers_BKS) != B or any(len(a) != K or any(len(s) != S for s in a) for a in answers_BKS):
        raise ValueError(f"answers_BKS must be [B={B}][K={K}][S={S}] like candidate_correct_BKS")
    if aggregation_correct_BKA.shape[:2] != (B, K):
        raise ValueError(f"aggregation_correct_BKA {tuple(aggregation_correct_BKA.shape)} must be [B={B}, K={K}, A]")
    majority_BK = torch.tensor(
        [
            [majority_vote_correct(answers, correct) for answers, correct in zip(answers_KS, correct_KS, strict=True)]
            for answers_KS, correct_KS in zip(answers_BKS, candidate_correct_BKS.tolist(), strict=True)
        ],
        dtype=torch.bool,
    ).view(B, K)
    accuracy_BK = aggregation_correct_BKA.float().mean(-1)
    nan = torch.full_like(accuracy_BK, math.nan)
    distinct_BK = torch.tensor(
        [[float(len({a for a in answers if a is not None})) for answers in answers_KS] for answers_KS in answers_BKS]
    ).view(B, K)
    return {
        "set_oracle": candidate_correct_BKS.any(-1).float(),
        "set_majority": majority_BK.float(),
        "accuracy": accuracy_BK,
        "recovery": torch.where(majority_BK, nan, accuracy_BK),
        "override": torch.where(majority_BK, 1.0 - accuracy_BK, nan),
        "distinct_answers": distinct_BK,
    }


def says_right(verdict: str) -> bool:
    """A verdict calls its candidate right when its last word is ``right`` (the convention of
    :meth:`Task.candidate_verdict <spiral_lit.tasks.base.Task.candidate_verdict>`)."""
    return verdict.split()[-1:] == ["right"]


def verdict_agreement(said: dict[int, str], truth: Sequence[str]) -> tuple[float, float, float]:
    """How one audit's verdict lines (``said``: ``{k: verdict}``, 1-based as shown) agree with the task's verdicts
    of the candidates in the order shown (``truth``): the fraction of candidates whose line is exactly the task's
    verdict, the fraction of wrong candidates it calls right, and the fraction of right candidates it does not
    call right (NaN when the set has no wrong, or no right, candidate). A candidate without a line is judged
    neither exactly nor right."""
    lines = [said.get(k + 1) for k in range(len(truth))]
    exact = sum(line == verdict for line, verdict in zip(lines, truth, strict=True)) / len(truth)
    right = [line is not None and says_right(line) for line in lines]
    wrong_called = [r for r, verdict in zip(right, truth, strict=True) if not says_right(verdict)]
    right_missed = [not r for r, verdict in zip(right, truth, strict=True) if says_right(verdict)]
    return (
        exact,
        sum(wrong_called) / len(wrong_called) if wrong_called else math.nan,
        sum(right_missed) / len(right_missed) if right_missed else math.nan,
    )


def paired_bootstrap_interval(
    a_N: torch.Tensor, b_N: torch.Tensor, n_resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean of b - a, low, high)``: a paired bootstrap percentile interval of the mean difference.

    ``a_N`` and ``b_N`` hold one value per problem for two checkpoints, the same problem at the same position.
    The bootstrap resamples problems (with replacement), not the two checkpoints separately: both checkpoints
    see the same problems and seeds (docs/algorithm.md §7.1), so most of the spread of either mean is problem
    difficulty, which the per-problem difference ``d = b - a`` cancels. Each of ``n_resamples`` resamples
    draws N problem indices (a ``torch.Generator`` seeded with ``seed``, so the interval is reproducible) and
    takes the mean of their ``d``; ``low`` and ``high`` are the ``(1 - level) / 2`` and ``1 - (1 - level) / 2``
    quantiles of those means (``torch.quantile``, linear interpolation). The first value is the observed mean
    of ``d``. Values must be finite: leave out problems where a rate is undefined (NaN) for either checkpoint.
    """
    if a_N.shape != b_N.shape or a_N.dim() != 1:
        raise ValueError(
            f"paired_bootstrap_interval needs two 1-d tensors of the same shape (one value per problem, paired); "
            f"got {tuple(a_N.shape)} and {tuple(b_N.shape)}"
        )
    N = a_N.numel()
    if N == 0:
        raise ValueError("paired_bootstrap_interval needs at least one problem; got empty tensors")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap_interval needs n_resamples >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap_interval needs 0 < level < 1, got {level}")
    d_N = b_N.detach().cpu().double() - a_N.detach().cpu().double()
    if not bool(torch.isfinite(d_N).all()):
        raise ValueError("paired_bootstrap_interval needs finite values; leave out the problems where either is NaN")
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**20 // N)  # resamples per draw, so that the index tensor stays near a million entries
    means = [
        d_N[torch.randint(N, (min(chunk, n_resamples - start), N), generator=generator)].mean(1)
        for start in range(0, n_resamples, chunk)
    ]
    tail = (1.0 - level) / 2
    low, high = torch.quantile(torch.cat(means), torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(d_N.mean()), low, high
