"""What one training step carries between its phases: the rollout shape and credit settings, the verifier's scores
and the credit (advantages, kept prompts, sequences to train on). Used by :mod:`spiral_lit.module`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.update import TrainSequence


@dataclass
class AlgorithmConfig:
    """The rollout shape and credit assignment (method.md sections 2, 3 and 5)."""

    algorithm: Literal["spiral", "grpo"] = "spiral"
    n_search: int = 8
    """Parallel search traces per prompt."""
    n_sets: int = 4
    """Distinct sets drawn per prompt (<= C(n_search, set_size))."""
    set_size: int = 4
    """Traces per set."""
    n_agg: int = 4
    """Aggregation traces per set."""
    scale_by_std: bool = False
    """Divide advantages by their group's std (off in the paper, Dr.GRPO style) [ours]."""
    length_target: int | None = None
    """Paper Eq. 8: positive advantages of sequences longer than this become 0."""
    drop_zero_signal: bool = True
    """Dynamic sampling: drop prompts whose advantages are all zero (every aggregation reward equal)."""
    max_refill_batches: int = 2
    """Dynamic sampling with replacement: while fewer than ``data.batch_size`` kept prompts are pending, roll out
    the next batch too before updating, at most this many extra batches per update (0 = update at once), so
    updates stay full of informative prompts. Logged: ``train/prompts_drawn``, ``prompts_kept``, ``refill_batches``."""

    def __post_init__(self) -> None:
        for key in ("n_search", "n_sets", "set_size", "n_agg"):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_refill_batches < 0:
            raise ValueError(f"algorithm.max_refill_batches must be >= 0, got {self.max_refill_batches}")
        if self.length_target is not None and self.length_target < 1:
            raise ValueError(f"algorithm.length_target must be >= 1 token (or null), got {self.length_target}")
        if self.algorithm == "grpo" and self.n_search < 2:
            raise ValueError(
                f"algorithm.n_search={self.n_search}: GRPO's baseline is the mean of a prompt's group, so a group "
                "of one has zero advantage and nothing is learnt; use n_search >= 2"
            )
        if self.algorithm == "spiral" and self.n_sets * self.n_agg < 2:
            raise ValueError(
                "algorithm.n_sets=1 with algorithm.n_agg=1: SPIRAL's advantages compare sets with each other and "
                "aggregations of a set with each other, so one aggregation per prompt learns nothing; raise either"
            )
        if self.algorithm == "spiral":
            if self.set_size > self.n_search:
                raise ValueError(
                    f"algorithm.set_size={self.set_size} exceeds algorithm.n_search={self.n_search}: "
                    "a set is drawn from the prompt's search traces"
                )
            n_subsets = math.comb(self.n_search, self.set_size)
            if self.n_sets > n_subsets:
                raise ValueError(
                    f"algorithm.n_sets={self.n_sets} but only C({self.n_search}, {self.set_size}) = {n_subsets} "
                    "distinct sets exist"
                )


@dataclass
class StepScores:
    """Phase 4's output: verifier results per role."""

    search: VerifyResult
    search_BN: torch.Tensor
    """[B, n_search] search rewards."""
    aggregation: VerifyResult | None = None
    rewards_BKA: torch.Tensor | None = None
    """[B, n_sets, n_agg] aggregation rewards (SPIRAL only)."""


@dataclass
class StepCredit:
    """Phase 5's output: advantages per role, the prompts kept by dynamic sampling, the credited sequences."""

    search_adv_BN: torch.Tensor
    agg_adv_BKA: torch.Tensor | None
    keep_B: torch.Tensor
    sequences: list[TrainSequence]
