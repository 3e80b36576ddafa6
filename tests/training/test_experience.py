"""experience.py: the training-step summaries of sets (aggregation diagnostics, docs/algorithm.md §7.4)."""

from __future__ import annotations

import pytest
import torch

from spiral_lit.training.experience import set_diagnostic_stats


def test_set_diagnostic_stats_pool_over_the_steps_sets() -> None:
    # One prompt, 4 search traces, sets {0, 1} (majority "a", right) and {2, 3} (tie "b"/"c" -> "b", wrong).
    answers = ["a", "a", "b", "c"]
    search_BN = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    sets_BKS = torch.tensor([[[0, 1], [2, 3]]])
    rewards_BKA = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    stats = set_diagnostic_stats(answers, search_BN, sets_BKS, rewards_BKA)
    assert stats == pytest.approx(
        {
            "sets/oracle": 0.5,
            "sets/majority": 0.5,
            "sets/recovery": 1.0,
            "sets/override": 0.5,
            "sets/distinct_answers": 1.5,
        }
    )


def test_undefined_rates_are_left_out() -> None:
    # Every set's majority is right: there is nothing to recover, so no recovery rate that step.
    stats = set_diagnostic_stats(["a", "a"], torch.tensor([[1.0, 1.0]]), torch.tensor([[[0, 1]]]), torch.ones(1, 1, 2))
    assert "sets/recovery" not in stats
    assert stats["sets/override"] == 0.0
