"""SPIRAL and GRPO advantages (docs/algorithm.md §3 and §5) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from spiral_lit.algorithms import (
    grpo_advantages,
    informative_groups,
    informative_prompts,
    informative_rounds,
    length_gate,
    recursive_advantages,
    sample_sets_batch,
    spiral_advantages,
)

# The worked example of docs/algorithm.md §3.3 as a full prompt: 8 search traces, 4 sets of 4, 4 aggregation
# samples per set.
#   set 1 rewards (1,1,1,0) -> f = 0.75;  set 2 (1,1,0,0) -> 0.5;
#   set 3 (1,0,0,0)         -> f = 0.25;  set 4 (0,1,0,1) -> 0.5.   mean f = 0.5
#   set advantages (+0.25, 0, -0.25, 0)
WORKED_REWARDS_BKA = torch.tensor(
    [[[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]]
)
WORKED_SETS_BKS = torch.tensor([[[0, 1, 2, 3], [1, 4, 5, 6], [0, 2, 4, 5], [3, 4, 5, 6]]])
# Trace membership -> search advantage = mean of the set advantages of its sets:
#   0: sets 1,3 -> (0.25 - 0.25)/2 = 0      1: sets 1,2 -> (0.25 + 0)/2 = 0.125
#   2: sets 1,3 -> 0                        3: sets 1,4 -> 0.125
#   4: sets 2,3,4 -> (0 - 0.25 + 0)/3 = -1/12   5: sets 2,3,4 -> -1/12
#   6: sets 2,4 -> 0                        7: no set -> 0
WORKED_SEARCH_ADV = [0.0, 0.125, 0.0, 0.125, -1 / 12, -1 / 12, 0.0, 0.0]
# Aggregation advantages: each reward minus its own set's mean.
WORKED_AGG_ADV = [
    [0.25, 0.25, 0.25, -0.75],
    [0.5, 0.5, -0.5, -0.5],
    [0.75, -0.25, -0.25, -0.25],
    [-0.5, 0.5, -0.5, 0.5],
]


def test_worked_example() -> None:
    search_BN, agg_BKA = spiral_advantages(WORKED_REWARDS_BKA, WORKED_SETS_BKS, n_search=8)
    torch.testing.assert_close(search_BN, torch.tensor([WORKED_SEARCH_ADV]))
    torch.testing.assert_close(agg_BKA, torch.tensor([WORKED_AGG_ADV]))
    assert search_BN.shape == (1, 8) and agg_BKA.shape == (1, 4, 4)


def test_worked_example_scaled_by_sample_std() -> None:
    # Sample (Bessel) std of set scores (0.75, 0.5, 0.25, 0.5): sum of squared deviations
    # 0.0625 + 0 + 0.0625 + 0 = 0.125, / (4 - 1) -> var 1/24, std 0.2041; set advantages
    # (+-0.25 / 0.2041) = (+sqrt(1.5), 0, -sqrt(1.5), 0) = (1.2247, 0, -1.2247, 0).
    # (The population std 0.1768 would give +-1.4142 instead.)
    # Trace 1 (sets 1,2): 1.2247/2 = 0.6124; trace 4 (sets 2,3,4): -1.2247/3 = -0.4082.
    # Aggregation set 1 (1,1,1,0): deviations (.25,.25,.25,-.75), squares sum 0.75, / 3 ->
    # var 0.25, std 0.5 -> (0.5, 0.5, 0.5, -1.5).
    search_BN, agg_BKA = spiral_advantages(WORKED_REWARDS_BKA, WORKED_SETS_BKS, n_search=8, scale_by_std=True)
    s = math.sqrt(1.5)
    expected_search = [0.0, s / 2, 0.0, s / 2, -s / 3, -s / 3, 0.0, 0.0]
    torch.testing.assert_close(search_BN, torch.tensor([expected_search]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(agg_BKA[0, 0], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=1e-5)


def test_trace_in_no_set_gets_zero() -> None:
    rewards_BKA = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # set advantages (+0.25, -0.25)
    sets_BKS = torch.tensor([[[0, 1], [1, 2]]])  # traces 3 and 4 in no set
    search_BN, _ = spiral_advantages(rewards_BKA, sets_BKS, n_search=5)
    torch.testing.assert_close(search_BN, torch.tensor([[0.25, 0.0, -0.25, 0.0, 0.0]]))


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_equal_rewards_give_zero_advantages(scale_by_std: bool, value: float) -> None:
    rewards_BKA = torch.full((2, 4, 4), value)
    sets_BKS = sample_sets_batch(2, 8, 4, 4, torch.Generator().manual_seed(0))
    search_BN, agg_BKA = spiral_advantages(rewards_BKA, sets_BKS, n_search=8, scale_by_std=scale_by_std)
    assert torch.equal(search_BN, torch.zeros(2, 8))
    assert torch.equal(agg_BKA, torch.zeros(2, 4, 4))
    grpo_BG = grpo_advantages(torch.full((2, 6), value), scale_by_std=scale_by_std)
    assert torch.equal(grpo_BG, torch.zeros(2, 6))


def _reference_spiral(rewards_BKA: torch.Tensor, sets_BKS: torch.Tensor, n_search: int) -> torch.Tensor:
    """Loop-by-loop transcription of docs/algorithm.md §3.1 (search advantages only)."""
    out = torch.zeros(rewards_BKA.shape[0], n_search)
    for b in range(rewards_BKA.shape[0]):
        f = [rewards_BKA[b, i].mean().item() for i in range(rewards_BKA.shape[1])]
        set_adv = [fi - sum(f) / len(f) for fi in f]
        for trace in range(n_search):
            mine = [set_adv[i] for i in range(len(f)) if trace in sets_BKS[b, i].tolist()]
            out[b, trace] = sum(mine) / len(mine) if mine else 0.0
    return out


def test_vectorised_matches_loop_reference_and_prompts_are_independent() -> None:
    gen = torch.Generator().manual_seed(3)
    rewards_BKA = torch.randint(0, 2, (5, 4, 4), generator=gen).float()
    sets_BKS = sample_sets_batch(5, 8, 4, 4, gen)
    search_BN, agg_BKA = spiral_advantages(rewards_BKA, sets_BKS, n_search=8)
    torch.testing.assert_close(search_BN, _reference_spiral(rewards_BKA, sets_BKS, 8))
    for b in range(5):
        one_search, one_agg = spiral_advantages(rewards_BKA[b : b + 1], sets_BKS[b : b + 1], n_search=8)
        torch.testing.assert_close(search_BN[b : b + 1], one_search)
        torch.testing.assert_close(agg_BKA[b : b + 1], one_agg)
    # Membership-weighted search advantages sum to S * sum_i A#_i = 0 (set advantages are centred).
    counts_BN = torch.zeros(5, 8).scatter_add_(1, sets_BKS.reshape(5, -1), torch.ones(5, 16))
    torch.testing.assert_close((counts_BN * search_BN).sum(-1), torch.zeros(5), atol=1e-6, rtol=0)


def test_spiral_advantages_errors() -> None:
    with pytest.raises(ValueError, match="matching B, K"):
        spiral_advantages(torch.zeros(1, 4, 4), torch.zeros(1, 3, 4, dtype=torch.long), n_search=8)
    with pytest.raises(ValueError, match="n_search=4"):
        spiral_advantages(torch.zeros(1, 1, 2), torch.tensor([[[0, 4]]]), n_search=4)


def test_grpo_advantages_hand_values() -> None:
    rewards_BG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # Group means 0.5 and 0.25.
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]])
    torch.testing.assert_close(grpo_advantages(rewards_BG), expected)
    # Sample std: (1,0,0,1): 4 * 0.25 / 3 = 1/3 -> 0.57735, 0.5 / 0.57735 = 0.86603;
    # (1,0,0,0): (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5 -> (1.5, -0.5, -0.5, -0.5).
    scaled = grpo_advantages(rewards_BG, scale_by_std=True)
    c = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(scaled, torch.tensor([[c, -c, -c, c], [1.5, -0.5, -0.5, -0.5]]), atol=1e-5, rtol=1e-5)


def test_group_of_one_is_zero_not_nan() -> None:
    assert torch.equal(grpo_advantages(torch.tensor([[0.7]]), scale_by_std=True), torch.zeros(1, 1))


def test_length_gate_eq8() -> None:
    adv_B = torch.tensor([0.5, -0.5, 0.0, 0.5, -0.2, 0.3])
    lengths_B = torch.tensor([10, 10, 10, 4, 4, 5])
    # Overlong (> 5) positive -> 0; overlong negative kept; at or under target untouched.
    expected = torch.tensor([0.0, -0.5, 0.0, 0.5, -0.2, 0.3])
    torch.testing.assert_close(length_gate(adv_B, lengths_B, length_target=5), expected)
    adv_BN = adv_B.reshape(2, 3)
    gated_BN = length_gate(adv_BN, lengths_B.reshape(2, 3), length_target=5)
    assert gated_BN.shape == (2, 3)
    torch.testing.assert_close(gated_BN, expected.reshape(2, 3))
    with pytest.raises(ValueError, match="must match"):
        length_gate(adv_B, lengths_B[:3], length_target=5)


def test_informative_filters() -> None:
    rewards_BKA = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # all right: no signal
            [[0.0, 0.0], [0.0, 0.0]],  # all wrong: no signal
            [[1.0, 1.0], [0.0, 0.0]],  # sets differ: keep
            [[0.0, 1.0], [0.0, 1.0]],  # equal set scores but siblings differ: keep
        ]
    )
    assert informative_prompts(rewards_BKA).tolist() == [False, False, True, True]
    assert informative_prompts(rewards_BKA).dtype == torch.bool
    rewards_BG = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0]])
    assert informative_groups(rewards_BG).tolist() == [False, True]


# Two trained rounds (docs/algorithm.md §10.2), by hand: 3 search traces, 2 sets of 2, 2 aggregations per set.
# Round 1: sets {0,1}, {1,2}; rewards (1,1), (0,1) -> f = (1, 0.5) around 0.75 -> set advantages (+0.25, -0.25);
#   search traces: 0 -> +0.25, 1 -> (0.25 - 0.25) / 2 = 0, 2 -> -0.25; siblings: (0, 0), (-0.5, +0.5).
# Round 1's traces flattened set-major: 0 = (set 0, a 0), 1 = (set 0, a 1), 2 = (set 1, a 0), 3 = (set 1, a 1).
# Round 2: sets {0,2}, {1,3}; rewards (1,0), (0,0) -> f = (0.5, 0) around 0.25 -> set advantages (+0.25, -0.25):
#   round-1 traces 0 and 2 get +0.25, 1 and 3 get -0.25; round 2's siblings: (+0.5, -0.5), (0, 0).
TWO_ROUND_REWARDS = [torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])]
TWO_ROUND_SETS = [torch.tensor([[[0, 1], [1, 2]]]), torch.tensor([[[0, 2], [1, 3]]])]


@pytest.mark.parametrize(
    ("weight", "round1"),
    [(1.0, [[0.25, -0.25], [-0.25, 0.25]]), (0.5, [[0.125, -0.125], [-0.375, 0.375]]), (0.0, [[0, 0], [-0.5, 0.5]])],
)
def test_two_rounds_by_hand(weight: float, round1: list[list[float]]) -> None:
    search_BN, (agg1_BKA, agg2_BKA) = recursive_advantages(
        TWO_ROUND_REWARDS, TWO_ROUND_SETS, n_search=3, next_round_weight=weight
    )
    torch.testing.assert_close(search_BN, torch.tensor([[0.25, 0.0, -0.25]]))
    torch.testing.assert_close(agg1_BKA, torch.tensor([round1]))  # siblings + weight * round 2's set credit
    torch.testing.assert_close(agg2_BKA, torch.tensor([[[0.5, -0.5], [0.0, 0.0]]]))  # the final round: siblings


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_one_round_is_spiral_exactly(scale_by_std: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    rewards_BKA = torch.randint(0, 2, (5, 4, 4), generator=generator).float()
    sets_BKS = sample_sets_batch(5, 8, 4, 4, generator)
    search_BN, agg = recursive_advantages(
        [rewards_BKA], [sets_BKS], 8, next_round_weight=0.7, scale_by_std=scale_by_std
    )
    expected_search, expected_agg = spiral_advantages(rewards_BKA, sets_BKS, 8, scale_by_std)
    assert torch.equal(search_BN, expected_search) and len(agg) == 1 and torch.equal(agg[0], expected_agg)


def test_later_rounds_sets_must_index_the_previous_rounds_traces() -> None:
    with pytest.raises(ValueError, match="round 2: sets must hold indices of round 1's 4 traces"):
        recursive_advantages(TWO_ROUND_REWARDS, [TWO_ROUND_SETS[0], torch.tensor([[[0, 4], [1, 3]]])], n_search=3)
    with pytest.raises(ValueError, match="one \\[B, K, A\\] rewards and one \\[B, K, S\\] sets per round"):
        recursive_advantages(TWO_ROUND_REWARDS, TWO_ROUND_SETS[:1], n_search=3)


def test_a_prompt_is_informative_when_any_round_varies() -> None:
    equal, varied = torch.ones(1, 2, 2), torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert informative_rounds([equal, varied]).tolist() == [True]
    assert informative_rounds([varied, equal]).tolist() == [True]
    # Equal within every round, even with different values across rounds: every advantage is 0.
    assert informative_rounds([equal, torch.zeros(1, 2, 2)]).tolist() == [False]
    assert torch.equal(informative_rounds([varied]), informative_prompts(varied))
