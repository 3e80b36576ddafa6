"""step_algorithm.py: SPIRAL and GRPO are chosen once, and each credits its traces on hand-computed rewards."""

from __future__ import annotations

import pytest
import torch

from spiral_lit.algorithms import informative_prompts, length_gate, sample_sets_batch, spiral_advantages
from spiral_lit.errors import UserError
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.scaffolds import AggregationRollout, SearchRollout
from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.training.experience import aggregation_sequences, search_sequences
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
    assert grpo.aggregate(None, [], None, lambda phase: 0) == []  # type: ignore[arg-type]


def test_grpo_credits_search_traces_against_their_group_mean() -> None:
    algorithm = GrpoAlgorithm(AlgorithmConfig(algorithm="grpo", n_search=2, length_target=5))
    search = SearchRollout([[1], [2]], [[_trace(3), _trace(9)], [_trace(3), _trace(3)]])
    search_BN = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    credit = algorithm.advantages(search, [], StepScores(_verified([0.0, 1.0, 1.0, 1.0]), search_BN))
    # Problem 0: -0.5 / +0.5, the +0.5 of the 9-token trace gated to 0; problem 1 has no signal and is dropped.
    assert credit.search_adv_BN.tolist() == [[-0.5, 0.0], [0.0, 0.0]]
    assert credit.keep_B.tolist() == [True, False] and credit.agg_adv_BKA == []
    assert [(s.advantage, s.role) for s in credit.sequences] == [(-0.5, 0), (0.0, 0)]


def test_spiral_credits_both_roles_through_the_sets() -> None:
    algorithm = SpiralAlgorithm(AlgorithmConfig(n_search=3, n_sets=2, set_size=2, n_agg=2), SamplingConfig())
    search = SearchRollout([[1]], [[_trace(2), _trace(2), _trace(2)]])
    sets_BKS = torch.tensor([[[0, 1], [1, 2]]])
    agg = AggregationRollout(sets_BKS, [[[5], [6]]], [[[_trace(2), _trace(2)], [_trace(2), _trace(2)]]])
    rewards_BKA = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    scores = StepScores(_verified([0.0] * 3), torch.zeros(1, 3), _verified([1.0, 1.0, 0.0, 1.0]), [rewards_BKA])
    credit = algorithm.advantages(search, [agg], scores)
    # Set means 1 and 0.5 around 0.75: +0.25 / -0.25; trace 1 joined both sets, so its credit averages to 0.
    assert credit.search_adv_BN.tolist() == [[0.25, 0.0, -0.25]]
    assert [a.tolist() for a in credit.agg_adv_BKA] == [[[[0.0, 0.0], [-0.5, 0.5]]]]
    assert [s.role for s in credit.sequences] == [0, 0, 0, 1, 1, 1, 1]


def test_two_trained_rounds_credit_round_one_through_round_two() -> None:
    """The hand-computed two-round example of tests/algorithms/test_advantages.py, through the strategy object."""
    config = AlgorithmConfig(n_search=3, n_sets=2, set_size=2, n_agg=2, train_rounds=2, next_round_weight=0.5)
    algorithm = SpiralAlgorithm(config, SamplingConfig())
    search = SearchRollout([[1]], [[_trace(2), _trace(2), _trace(2)]])
    round1 = AggregationRollout(torch.tensor([[[0, 1], [1, 2]]]), [[[5], [6]]], [[[_trace(2)] * 2, [_trace(2)] * 2]])
    round2 = AggregationRollout(torch.tensor([[[0, 2], [1, 3]]]), [[[7], [8]]], [[[_trace(2)] * 2, [_trace(2)] * 2]])
    rewards = [torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])]
    verified = _verified(torch.cat([r.flatten() for r in rewards]).tolist())
    credit = algorithm.advantages(
        search, [round1, round2], StepScores(_verified([0.0] * 3), torch.zeros(1, 3), verified, rewards)
    )
    assert credit.search_adv_BN.tolist() == [[0.25, 0.0, -0.25]]
    assert [a.tolist() for a in credit.agg_adv_BKA] == [
        [[[0.125, -0.125], [-0.375, 0.375]]],
        [[[0.5, -0.5], [0.0, 0.0]]],
    ]
    advantages = [s.advantage for s in credit.sequences]
    assert advantages == [0.25, 0.0, -0.25, 0.125, -0.125, -0.375, 0.375, 0.5, -0.5, 0.0, 0.0]
    assert [s.role for s in credit.sequences] == [0] * 3 + [1] * 8


def test_grpo_and_too_few_round_one_traces_refuse_train_rounds() -> None:
    with pytest.raises(UserError, match="train_rounds=2 with algorithm: grpo"):
        AlgorithmConfig(algorithm="grpo", train_rounds=2)
    with pytest.raises(UserError, match=r"only C\(2, 4\) = 0 exist"):
        AlgorithmConfig(n_search=4, n_sets=1, set_size=4, n_agg=2, train_rounds=2)
    with pytest.raises(UserError, match="train_rounds must be >= 1"):
        AlgorithmConfig(train_rounds=0)


def test_one_trained_round_credits_as_spiral_did() -> None:
    """``train_rounds: 1`` hands the update exactly the sequences of SPIRAL's credit (docs/algorithm.md §3):
    spiral_advantages, the length gate, informative_prompts, then search and aggregation sequences."""
    generator = torch.Generator().manual_seed(3)
    config = AlgorithmConfig(n_search=4, n_sets=3, set_size=2, n_agg=2, length_target=4)
    search = SearchRollout(
        [[1], [2], [3]], [[_trace(int(n)) for n in row] for row in torch.randint(1, 8, (3, 4), generator=generator)]
    )
    lengths_BKA = torch.randint(1, 8, (3, 3, 2), generator=generator)
    traces = [[[_trace(int(n)) for n in per_set] for per_set in per_problem] for per_problem in lengths_BKA]
    agg = AggregationRollout(sample_sets_batch(3, 4, 3, 2, generator), [[[5]] * 3] * 3, traces)
    rewards_BKA = torch.randint(0, 2, (3, 3, 2), generator=generator).float()
    rewards_BKA[1] = 1.0  # a prompt without signal, dropped
    scores = StepScores(
        _verified([0.0] * 12), torch.zeros(3, 4), _verified(rewards_BKA.flatten().tolist()), [rewards_BKA]
    )
    credit = SpiralAlgorithm(config, SamplingConfig()).advantages(search, [agg], scores)

    search_adv_BN, agg_adv_BKA = spiral_advantages(rewards_BKA, agg.sets_BKS, 4)
    search_lengths = torch.tensor([[t.num_tokens for t in ts] for ts in search.traces])
    search_adv_BN, agg_adv_BKA = length_gate(search_adv_BN, search_lengths, 4), length_gate(agg_adv_BKA, lengths_BKA, 4)
    keep_B = informative_prompts(rewards_BKA)
    expected = search_sequences(search, search_adv_BN, keep_B) + aggregation_sequences(agg, agg_adv_BKA, keep_B)
    assert keep_B.tolist() == [True, False, True] and credit.keep_B.tolist() == keep_B.tolist()
    assert [(s.prompt_ids, s.completion, s.advantage, s.role) for s in credit.sequences] == [
        (s.prompt_ids, s.completion, s.advantage, s.role) for s in expected
    ]
