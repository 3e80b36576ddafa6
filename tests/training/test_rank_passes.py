"""rank_passes.py: the rank-summed counts a normaliser is computed from, and passes padded to the busiest rank."""

from __future__ import annotations

import torch

from spiral_lit.training.rank_passes import lockstep_passes, rank_summed_counts


def test_counts_are_summed_per_role_in_one_reduction() -> None:
    calls: list[torch.Tensor] = []

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:  # another rank with 10 search tokens in 2 sequences
        calls.append(t.clone())
        return t + torch.tensor([10.0, 0.0, 2.0, 0.0])

    tokens_R, sequences_R = rank_summed_counts([0, 1, 1, 0], [3, 5, 7, 2], reduce_sum, torch.device("cpu"))
    assert len(calls) == 1 and calls[0].tolist() == [5.0, 12.0, 2.0, 2.0]
    assert tokens_R.tolist() == [15.0, 12.0] and sequences_R.tolist() == [4.0, 2.0]


def test_a_rank_with_fewer_micro_batches_pads_up_to_the_busiest() -> None:
    events: list[str] = []

    def reduce_max(t: torch.Tensor) -> torch.Tensor:  # the busiest rank has 4 micro-batches
        events.append(f"agree {int(t)}")
        return torch.maximum(t, torch.tensor(4.0))

    out = lockstep_passes(["a", "b"], lambda b: events.append(b) or b.upper(), lambda: events.append("pad"),
                          reduce_max, torch.device("cpu"))  # fmt: skip
    assert out == ["A", "B"]
    assert events == ["agree 2", "a", "b", "pad", "pad"]  # agreed before the first pass
    assert lockstep_passes([], str, lambda: events.append("only pad"), lambda t: t + 1, torch.device("cpu")) == []
    assert events[-1] == "only pad"
