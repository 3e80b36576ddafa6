"""Compositions of the three compute primitives over one rollout engine.

- parallel search: ``n`` independent traces per problem;
- aggregation: one prompt per set of earlier traces, ``n_agg`` traces per prompt.

Used by training (the SPIRAL rollout, method.md section 2) and evaluation alike, so the
two never drift apart. Seeds are derived from (seed, phase) by the caller; candidate
order uses a ``random.Random`` seeded per (seed, problem, set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from spiral_lit.prompts import PromptRenderer
from spiral_lit.rollout.base import Completion, RolloutEngine, SamplingConfig
from spiral_lit.tasks.base import Problem


@dataclass
class SearchRollout:
    """``n`` search traces per problem."""

    prompts: list[list[int]]
    """[B] search prompt ids."""
    traces: list[list[Completion]]
    """[B][n]."""


@dataclass
class AggregationRollout:
    """``n_agg`` aggregation traces for each of the K sets of each problem."""

    sets_BKS: torch.Tensor
    """[B, K, S] indices into the problem's search traces."""
    prompts: list[list[list[int]]]
    """[B][K] aggregation prompt ids."""
    traces: list[list[list[Completion]]]
    """[B][K][n_agg]."""


def sample_search(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    problems: list[Problem],
    n: int,
    sampling: SamplingConfig,
    seed: int,
) -> SearchRollout:
    prompts = [renderer.search(p) for p in problems]
    return SearchRollout(prompts, engine.generate(prompts, n, sampling, seed))


def sample_aggregations(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    problems: list[Problem],
    candidates: list[list[Completion]],
    sets_BKS: torch.Tensor,
    n_agg: int,
    sampling: SamplingConfig,
    seed: int,
) -> AggregationRollout:
    """One aggregation prompt per set (problem + its candidates), ``n_agg`` samples each."""
    B, K, _ = sets_BKS.shape
    prompts = [
        [
            renderer.aggregation(
                problem,
                [candidates[b][int(i)].token_ids for i in sets_BKS[b, k]],
                random.Random(f"{seed}/{b}/{k}"),
            )
            for k in range(K)
        ]
        for b, problem in enumerate(problems)
    ]
    flat = engine.generate([p for per_problem in prompts for p in per_problem], n_agg, sampling, seed)
    traces = [flat[b * K : (b + 1) * K] for b in range(B)]
    return AggregationRollout(sets_BKS, prompts, traces)
