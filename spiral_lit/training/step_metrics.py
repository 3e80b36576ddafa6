"""The scalars a SPIRAL/GRPO step logs: rewards, accuracies, advantages, set diagnostics, trace lengths, verifier
counts, the update's statistics and the phases' wall-clock times (docs/algorithm.md §7.4 for the set diagnostics)."""

from __future__ import annotations

import time
from collections.abc import Hashable
from contextlib import contextmanager

import torch

from spiral_lit.evaluation.metrics import majority_vote_correct
from spiral_lit.scaffolds import AggregationRollout, SearchRollout
from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.training.experience import advantage_stats, set_diagnostic_stats, set_stats, trace_stats
from spiral_lit.training.step_config import StepCredit, StepScores


def step_metrics(
    n_search: int,
    search: SearchRollout,
    rounds: list[AggregationRollout],
    scores: StepScores,
    credit: StepCredit,
    update_stats: dict[str, float],
    seconds: dict[str, float],
    search_keys: list[Hashable | None],
) -> dict[str, float]:
    """This rank's scalars of one step (the caller averages them over ranks).

    ``search_keys``: the answer keys of the B * n_search search answers, problem-major
    (:func:`spiral_lit.tasks.base.answer_keys`); majority vote and the set diagnostics compare them.
    ``rounds``: the trained rounds of aggregation (none for GRPO). ``reward/aggregation`` is the last round's; the
    set statistics are round 1's, whose sets hold search traces; with several rounds each round's reward is logged
    as ``reward/aggregation_round<r>``.
    """
    search_flat = [t for ts in search.traces for t in ts]
    metrics = _search_metrics(n_search, scores, credit, search_keys) | trace_stats("search", search_flat)
    metrics |= _verify_stats("search", scores.search)
    generated = sum(t.num_tokens for t in search_flat)
    if rounds and scores.aggregation is not None:
        agg_flat = [t for agg in rounds for per_problem in agg.traces for per_set in per_problem for t in per_set]
        generated += sum(t.num_tokens for t in agg_flat)
        first_BKA = scores.rewards_BKA[0]
        metrics |= {"reward/aggregation": float(scores.rewards_BKA[-1].mean())} | set_stats(first_BKA)
        if len(rounds) > 1:
            metrics |= {f"reward/aggregation_round{r + 1}": float(x.mean()) for r, x in enumerate(scores.rewards_BKA)}
        metrics |= set_diagnostic_stats(search_keys, scores.search_BN, rounds[0].sets_BKS, first_BKA)
        all_adv = torch.cat([adv.flatten() for adv in credit.agg_adv_BKA])
        metrics |= advantage_stats("aggregation", all_adv) | trace_stats("aggregation", agg_flat)
        metrics |= _verify_stats("aggregation", scores.aggregation)
    metrics |= {f"train/{k}": v for k, v in update_stats.items()}
    metrics |= {f"time/{k}": v for k, v in seconds.items()}
    metrics["time/generate_tokens_per_s"] = generated / max(seconds["generate"], 1e-9)
    return metrics


def _search_metrics(n: int, scores: StepScores, credit: StepCredit, keys: list[Hashable | None]) -> dict[str, float]:
    keys_BN = [keys[b * n : (b + 1) * n] for b in range(scores.search_BN.shape[0])]
    correct = (scores.search_BN >= 1.0).tolist()
    maj = [float(majority_vote_correct(k, c)) for k, c in zip(keys_BN, correct, strict=True)]
    return {
        "reward/search": float(scores.search_BN.mean()),
        "search/accuracy": float((scores.search_BN >= 1.0).float().mean()),
        "search/majority_accuracy": sum(maj) / len(maj),
        "zero_signal_fraction": 1.0 - float(credit.keep_B.float().mean()),
    } | advantage_stats("search", credit.search_adv_BN)


def _verify_stats(role: str, result: VerifyResult) -> dict[str, float]:
    return {
        f"verify/{role}_timeouts": float(result.n_timeouts),
        f"verify/{role}_errors": float(result.n_errors),
        f"verify/{role}_rejected": float(result.n_rejected),
        f"verify/{role}_unparsed": float(result.n_unparsed),
    }


class PhaseTimer:
    """Wall-clock seconds per phase of a step, summed over its ``with timer("phase"):`` blocks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):  # noqa: ANN204 - a context manager
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
