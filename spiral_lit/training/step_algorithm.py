"""Phases 2-5 of a training step, the part that differs between SPIRAL and GRPO, as one strategy object chosen once
from ``algorithm.algorithm`` by :func:`make_algorithm` (the one place the choice is made):

- :class:`SpiralAlgorithm` (docs/algorithm.md §2-3): distinct sets of each prompt's search traces, ``n_agg``
  aggregation traces per set, rewards of the aggregations, set-RL advantages for the search traces and
  sibling-mean advantages for the aggregation traces; with ``train_rounds > 1``, further rounds aggregating sets
  of the previous round's traces, credited through the next round's sets too (§10);
- :class:`GrpoAlgorithm` (docs/algorithm.md §5): no sets and no aggregation; rewards of the search traces, group-mean
  advantages.

Both gate long sequences' positive advantages (``length_target``) and drop prompts without signal (dynamic
sampling, §3.5-3.6) the same way, and hand the LightningModule the credited sequences of phase 6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from spiral_lit.algorithms import (
    grpo_advantages,
    informative_groups,
    informative_rounds,
    length_gate,
    recursive_advantages,
    sample_sets_batch,
)
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.runtime.policy import Sampler
from spiral_lit.scaffolds import AggregationRollout, SearchRollout, sample_aggregations
from spiral_lit.tasks.base import Problem
from spiral_lit.tasks.verify import Verifier
from spiral_lit.training.experience import aggregation_sequences, search_sequences
from spiral_lit.training.step_config import AlgorithmConfig, StepCredit, StepScores

PhaseSeed = Callable[[int], int]
"""Phase number -> this step's seed of that phase (:func:`spiral_lit.scaffolds.step_seed`)."""


class StepAlgorithm(Protocol):
    """What a step asks of the algorithm between its search traces (phase 1) and its update (phase 6)."""

    def aggregate(
        self, sampler: Sampler, batch: list[Problem], search: SearchRollout, seed: PhaseSeed
    ) -> list[AggregationRollout]:
        """Phases 2-3: per trained round, its sets and their aggregation traces (none: this algorithm aggregates
        nothing)."""
        ...

    def verify(
        self, verifier: Verifier, batch: list[Problem], search: SearchRollout, rounds: list[AggregationRollout]
    ) -> StepScores:
        """Phase 4: every trace's reward."""
        ...

    def advantages(self, search: SearchRollout, rounds: list[AggregationRollout], scores: StepScores) -> StepCredit:
        """Phase 5: advantages, the prompts kept by dynamic sampling and the credited sequences."""
        ...


def make_algorithm(config: AlgorithmConfig, aggregation_sampling: SamplingConfig) -> StepAlgorithm:
    """The strategy of ``algorithm.algorithm``: the one place SPIRAL and GRPO are told apart in a step."""
    if config.algorithm == "spiral":
        return SpiralAlgorithm(config, aggregation_sampling)
    if config.algorithm == "grpo":
        return GrpoAlgorithm(config)
    raise ValueError(f"model.init_args.algorithm.algorithm={config.algorithm!r}; allowed: 'spiral', 'grpo'")


@dataclass
class SpiralAlgorithm:
    """SPIRAL: the search traces are credited through the sets they joined (docs/algorithm.md §3); with
    ``train_rounds > 1``, each round's aggregations through the next round's sets too (§10)."""

    config: AlgorithmConfig
    sampling: SamplingConfig
    """Sampling of the aggregation traces."""

    def aggregate(
        self, sampler: Sampler, batch: list[Problem], search: SearchRollout, seed: PhaseSeed
    ) -> list[AggregationRollout]:
        """Round 1 aggregates sets of the search traces; round r >= 2 sets of round r - 1's traces (§10.1)."""
        cfg = self.config
        rounds: list[AggregationRollout] = []
        candidates, n_candidates = search.traces, cfg.n_search
        for r in range(cfg.train_rounds):
            # Round 1 keeps SPIRAL's phase seeds 2 and 3; round r + 1 uses 10 r + 2 and 10 r + 3.
            generator = torch.Generator().manual_seed(seed(10 * r + 2))
            sets_BKS = sample_sets_batch(len(batch), n_candidates, cfg.n_sets, cfg.set_size, generator)
            rounds.append(
                sample_aggregations(
                    sampler.engine, sampler.renderer, batch, candidates, sets_BKS, cfg.n_agg, self.sampling,
                    seed(10 * r + 3),
                )
            )  # fmt: skip
            # The next round reads this round's traces, flattened set-major (trace k * n_agg + a).
            candidates = [[t for per_set in per_problem for t in per_set] for per_problem in rounds[-1].traces]
            n_candidates = cfg.n_sets * cfg.n_agg
        return rounds

    def verify(
        self, verifier: Verifier, batch: list[Problem], search: SearchRollout, rounds: list[AggregationRollout]
    ) -> StepScores:
        """Score every trace; the search scores are for monitoring only (docs/algorithm.md §2.4)."""
        cfg = self.config
        scores = _score_search(verifier, batch, search, cfg.n_search)
        # Every round's traces in one call, so the verifier's workers share them (round-major).
        agg_texts = [
            t.final_text for agg in rounds for per_problem in agg.traces for per_set in per_problem for t in per_set
        ]
        problems = [p for _ in rounds for p in batch for _ in range(cfg.n_sets * cfg.n_agg)]
        scores.aggregation = verifier.score(problems, agg_texts)
        rewards_RBKA = torch.tensor(scores.aggregation.rewards).view(len(rounds), len(batch), cfg.n_sets, cfg.n_agg)
        scores.rewards_BKA = list(rewards_RBKA.unbind(0))
        return scores

    def advantages(self, search: SearchRollout, rounds: list[AggregationRollout], scores: StepScores) -> StepCredit:
        cfg = self.config
        search_adv_BN, agg_adv = recursive_advantages(
            scores.rewards_BKA, [agg.sets_BKS for agg in rounds], cfg.n_search, cfg.next_round_weight, cfg.scale_by_std
        )
        keep_B = informative_rounds(scores.rewards_BKA)
        if cfg.length_target is not None:
            search_adv_BN = length_gate(search_adv_BN, _lengths(search.traces), cfg.length_target)
            agg_adv = [
                length_gate(
                    adv_BKA, torch.stack([_lengths(per_problem) for per_problem in agg.traces]), cfg.length_target
                )
                for agg, adv_BKA in zip(rounds, agg_adv, strict=True)
            ]
        keep_B = _dynamic_sampling(keep_B, cfg)
        sequences = search_sequences(search, search_adv_BN, keep_B)
        for agg, adv_BKA in zip(rounds, agg_adv, strict=True):
            sequences += aggregation_sequences(agg, adv_BKA, keep_B)
        return StepCredit(search_adv_BN, agg_adv, keep_B, sequences)


@dataclass
class GrpoAlgorithm:
    """GRPO, the baseline: each search trace's reward minus its group's mean (docs/algorithm.md §5)."""

    config: AlgorithmConfig

    def aggregate(
        self, sampler: Sampler, batch: list[Problem], search: SearchRollout, seed: PhaseSeed
    ) -> list[AggregationRollout]:
        return []

    def verify(
        self, verifier: Verifier, batch: list[Problem], search: SearchRollout, rounds: list[AggregationRollout]
    ) -> StepScores:
        return _score_search(verifier, batch, search, self.config.n_search)

    def advantages(self, search: SearchRollout, rounds: list[AggregationRollout], scores: StepScores) -> StepCredit:
        cfg = self.config
        search_adv_BN = grpo_advantages(scores.search_BN, cfg.scale_by_std)
        keep_B = informative_groups(scores.search_BN)
        if cfg.length_target is not None:
            search_adv_BN = length_gate(search_adv_BN, _lengths(search.traces), cfg.length_target)
        keep_B = _dynamic_sampling(keep_B, cfg)
        return StepCredit(search_adv_BN, [], keep_B, search_sequences(search, search_adv_BN, keep_B))


def _score_search(verifier: Verifier, batch: list[Problem], search: SearchRollout, n_search: int) -> StepScores:
    """The search traces' rewards ``[B, n_search]``."""
    result = verifier.score([p for p in batch for _ in range(n_search)], [t.text for ts in search.traces for t in ts])
    return StepScores(result, torch.tensor(result.rewards).view(len(batch), n_search))


def _dynamic_sampling(keep_B: torch.Tensor, config: AlgorithmConfig) -> torch.Tensor:
    """The prompts to train on: those with signal, or all of them with ``drop_zero_signal: false``."""
    return keep_B if config.drop_zero_signal else torch.ones_like(keep_B)


def _lengths(traces: list[list[Completion]]) -> torch.Tensor:
    """Token counts of ``[B][N]`` traces: ``[B, N]``."""
    return torch.tensor([[t.num_tokens for t in ts] for ts in traces])
