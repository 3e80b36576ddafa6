"""What one training step carries between its phases: the rollout shape and credit settings, the verifier's scores
and the credit (advantages, kept prompts, sequences to train on). Used by :mod:`spiral_lit.training.spiral_module`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from spiral_lit.errors import UserError
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.training.update import TrainSequence

_KEY = "model.init_args.algorithm."


@dataclass
class AlgorithmConfig:
    """The rollout shape and credit assignment (docs/algorithm.md §2, §3 and §5)."""

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
    train_rounds: int = 1
    """Rounds of aggregation trained per step (docs/algorithm.md §10): 1 is SPIRAL; round r >= 2 draws ``n_sets``
    sets of ``set_size`` from round r - 1's ``n_sets * n_agg`` traces and aggregates each ``n_agg`` times [ours]."""
    next_round_weight: float = 1.0
    """With ``train_rounds >= 2``: weight of the next round's set credit in an intermediate round's advantage."""

    def __post_init__(self) -> None:
        for key in ("n_search", "n_sets", "set_size", "n_agg"):
            if getattr(self, key) < 1:
                raise UserError(f"{_KEY}{key} must be >= 1, got {getattr(self, key)}")
        if self.max_refill_batches < 0:
            raise UserError(f"{_KEY}max_refill_batches must be >= 0, got {self.max_refill_batches}")
        if self.length_target is not None and self.length_target < 1:
            raise UserError(f"{_KEY}length_target must be >= 1 token (or null), got {self.length_target}")
        if self.train_rounds < 1:
            raise UserError(f"{_KEY}train_rounds must be >= 1 (1 is SPIRAL), got {self.train_rounds}")
        if self.algorithm == "grpo" and self.train_rounds != 1:
            raise UserError(
                f"{_KEY}train_rounds={self.train_rounds} with algorithm: grpo: GRPO trains no aggregation; use "
                "algorithm: spiral"
            )
        if self.algorithm == "grpo" and self.n_search < 2:
            raise UserError(
                f"{_KEY}n_search={self.n_search}: GRPO's baseline is the mean of a prompt's group, so a group "
                "of one has zero advantage and nothing is learnt; use n_search >= 2"
            )
        if self.algorithm == "spiral":
            self._check_spiral_shape()

    def _check_spiral_shape(self) -> None:
        """Sets must exist, and each advantage of docs/algorithm.md §3 must be able to differ from 0."""
        if self.n_sets * self.n_agg < 2:
            raise UserError(
                f"{_KEY}n_sets=1 with algorithm.n_agg=1: SPIRAL's advantages compare sets with each other and "
                "aggregations of a set with each other, so one aggregation per prompt learns nothing; use "
                "n_sets >= 2 and n_agg >= 2"
            )
        if self.n_agg == 1:
            raise UserError(
                f"{_KEY}n_agg=1: a set's aggregation advantage R[i, j] - mean_j' R[i, j'] compares the set's "
                "aggregations with each other, so with one aggregation per set it is 0 and the aggregator never "
                f"learns (docs/algorithm.md §3.7). Use n_agg >= 2 (the paper uses 4), or {_KEY}algorithm: grpo to "
                "train the search role alone"
            )
        if self.set_size > self.n_search:
            raise UserError(
                f"{_KEY}set_size={self.set_size} exceeds algorithm.n_search={self.n_search}: "
                "a set is drawn from the prompt's search traces"
            )
        population = self.n_sets * self.n_agg
        if self.train_rounds > 1 and math.comb(population, self.set_size) < self.n_sets:
            raise UserError(
                f"{_KEY}train_rounds={self.train_rounds}: round 2 draws algorithm.n_sets={self.n_sets} distinct sets "
                f"of set_size={self.set_size} from round 1's n_sets * n_agg = {population} traces, but only "
                f"C({population}, {self.set_size}) = {math.comb(population, self.set_size)} exist"
            )
        n_subsets = math.comb(self.n_search, self.set_size)
        if self.n_sets > n_subsets:
            raise UserError(
                f"{_KEY}n_sets={self.n_sets} but only C({self.n_search}, {self.set_size}) = {n_subsets} distinct "
                f"sets exist: lower n_sets, or use set_size < n_search (every set of n_search traces is the same)"
            )
        if self.n_sets == 1:
            # A user may mean it (train the aggregator alone), so this warns instead of refusing.
            warnings.warn(
                f"{_KEY}n_sets=1: a set's advantage f_i - mean_i' f_i' compares the prompt's sets with each other, "
                "so with one set every search trace gets advantage 0 and only the aggregator learns "
                "(docs/algorithm.md §3.7). Use n_sets >= 2 (with set_size < n_search) to train the search role too",
                UserWarning,
                stacklevel=2,
            )


def check_training_sampling(
    algo: AlgorithmConfig, search: SamplingConfig, aggregation: SamplingConfig, key: str = "model.init_args."
) -> None:
    """Refuse greedy sampling of a role that training credits by comparing samples of the same prompt.

    Greedy decoding gives every sample of a prompt the same text, so the group baselines of docs/algorithm.md §3
    and §5 equal each sample's reward (§3.7). Evaluation may decode greedily; this check is for ``fit`` only.
    """
    if search.temperature == 0:
        why = (
            "every reward of a group is the same and every advantage is 0: nothing is learnt"
            if algo.algorithm == "grpo"
            else "every set holds the same candidates, and the search traces' credit is only the noise of "
            "aggregation sampling"
        )
        raise UserError(
            f"{key}search_sampling.temperature=0 (greedy) for training: the {algo.n_search} search traces of a "
            f"prompt are identical, so {why}. Sample for training (temperature 1.0 in the paper); greedy decoding "
            "is fine for evaluation: pass --model.init_args.search_sampling.temperature 0 to validate or test"
        )
    if algo.algorithm == "spiral" and aggregation.temperature == 0:
        raise UserError(
            f"{key}aggregation_sampling.temperature=0 (greedy) for training: the {algo.n_agg} aggregations of a "
            "set are identical, so every aggregation advantage R[i, j] - mean_j' R[i, j'] is 0 and the aggregator "
            "never learns. Sample for training (temperature 1.0 in the paper); greedy decoding is fine for "
            "evaluation: pass --model.init_args.aggregation_sampling.temperature 0 to validate or test"
        )


@dataclass
class StepScores:
    """Phase 4's output: verifier results per role, the aggregations' per round."""

    search: VerifyResult
    search_BN: torch.Tensor
    """[B, n_search] search rewards."""
    aggregation: VerifyResult | None = None
    """Every trained round's aggregation traces, round-major (SPIRAL only)."""
    rewards_BKA: list[torch.Tensor] = field(default_factory=list)
    """Per round, [B, n_sets, n_agg] aggregation rewards."""


@dataclass
class StepCredit:
    """Phase 5's output: advantages per role (the aggregations' per round), the prompts kept by dynamic sampling,
    the credited sequences."""

    search_adv_BN: torch.Tensor
    agg_adv_BKA: list[torch.Tensor]
    keep_B: torch.Tensor
    sequences: list[TrainSequence]
