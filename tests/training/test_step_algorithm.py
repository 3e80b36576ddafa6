"""step_algorithm.py: SPIRAL and GRPO are chosen once, and each credits its traces on hand-computed rewards."""

from __future__ import annotations

import torch

from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.scaffolds import AggregationRollout, SearchRollout
from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.training.step_algorithm import GrpoAlgorithm, SpiralAlgorithm, make_algorithm
from spiral_lit.training.step_config import AlgorithmConfig, StepScores


def _trace(n_tokens: int) -> Completion:
    return Completion(token_ids=[1] * n_tokens, logprobs=torch.zeros(n_tokens), finish_reason="length", text="")


def _verified(rewards: list[float]) -> VerifyResult:
    return VerifyResult(rewards=rewards, extracted=[None] * len(rewards))


def test_the_algorithm_is_chosen_once_from_the_config() -> None:
    spiral = AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2)
    assert isinstance(make_algorithm(spiral, SamplingConfig()), SpiralAlgorithm)
    grpo = make_algorithm(AlgorithmConfig(algorithm="grpo", n_search=4), SamplingConfig())
    assert isinstance(grpo, GrpoAlgorithm)
    assert grpo.aggregate(None, [], None, lambda phase: 0) is None  # type: ignore[arg-type]


def test_grpo_credits_search_traces_against_their_group_mean() -> None:
    algorithm = GrpoAlgorithm(AlgorithmConfig(algorithm="grpo", n_search=2, length_target=5))
    search = SearchRollout([[1], [2]], [[_trace(3), _trace(9)], [_trace(3), _trace(3)]])
    search_BN = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    credit = algorithm.advantages(search, None, StepScores(_verified([0.0, 1.0, 1.0, 1.0]), search_BN))
    # Problem 0: -0.5 / +0.5, the +0.5 of the 9-token trace gated to 0; problem 1 has no signal and is dropped.
    assert credit.search_adv_BN.tolist() == [[-0.5, 0.0], [0.0, 0.0]]
    assert credit.keep_B.tolist() == [True, False] and credit.agg_adv_BKA is None
    assert [(s.advantage, s.role) for s in credit.sequences] == [(-0.5, 0), (0.0, 0)]


def test_spiral_credits_both_roles_through_the_sets() -> None:
    algorithm = SpiralAlgorithm(AlgorithmConfig(n_search=3, n_sets=2, set_size=2, n_agg=2), SamplingConfig())
    search = SearchRollout([[1]], [[_trace(2), _trace(2), _trace(2)]])
    sets_BKS = torch.tensor([[[0, 1], [1, 2]]])
    agg = AggregationRollout(sets_BKS, [[[5], [6]]], [[[_trace(2), _trace(2)], [_trace(2), _trace(2)]]])
    rewards_BKA = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    scores = StepScores(_verified([0.0] * 3), torch.zeros(1, 3), _verified([1.0, 1.0, 0.0, 1.0]), rewards_BKA)
    credit = algorithm.advantages(search, agg, scores)
    # Set means 1 and 0.5 around 0.75: +0.25 / -0.25; trace 1 joined both sets, so its credit averages to 0.
    assert credit.search_adv_BN.tolist() == [[0.25, 0.0, -0.25]]
    assert credit.agg_adv_BKA.tolist() == [[[0.0, 0.0], [-0.5, 0.5]]]
    assert [s.role for s in credit.sequences] == [0, 0, 0, 1, 1, 1, 1]
