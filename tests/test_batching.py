"""batching.py: packing (prompt, completion) pairs into next-token tensors, and length bucketing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spiral_lit.batching import length_buckets, pack

# Row 0: prompt [1, 2, 3] + completion [5, 6]; row 1: prompt [4] + completion [7, 8] (one shorter, right-padded).
PROMPTS = [[1, 2, 3], [4]]
COMPLETIONS = [[5, 6], [7, 8]]


def test_pack_hand_checked() -> None:
    batch = pack(
        PROMPTS, COMPLETIONS, pad_id=0, token_values={"old": [torch.tensor([0.5, 0.25]), torch.tensor([1.5, 2.5])]}
    )
    assert batch.input_ids_BT.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Logit t predicts token t+1.
    assert batch.targets_BT1.tolist() == [[2, 3, 5, 6], [7, 8, 0, 0]]
    # Completion targets sit at positions prompt_len-1 .. prompt_len-1+len(c)-1: [2, 3] and [0, 1].
    assert batch.completion_mask_BT1.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert batch.values_BT1["old"].tolist() == [[0.0, 0.0, 0.5, 0.25], [1.5, 2.5, 0.0, 0.0]]
    assert batch.values_BT1["old"].dtype == torch.float32
    assert batch.rows == [0, 1]
    assert batch.input_ids_BT.dtype == torch.long
    assert batch.completion_mask_BT1.dtype == torch.bool


def test_pack_masked_targets_are_exactly_the_completions() -> None:
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, rows=[7, 3])
    assert batch.rows == [7, 3]
    assert batch.targets_BT1[batch.completion_mask_BT1].tolist() == [5, 6, 7, 8]
    assert batch.values_BT1 == {}


def test_pack_uses_the_pad_id_and_truncates_values_to_the_completion() -> None:
    batch = pack([[1, 2]], [[3]], pad_id=9, token_values={"v": [torch.tensor([4.0, 99.0])]})
    assert batch.input_ids_BT.tolist() == [[1, 2, 3]]
    assert batch.values_BT1["v"].tolist() == [[0.0, 4.0]]
    padded = pack([[1, 2], [1]], [[3], [2]], pad_id=9)
    assert padded.input_ids_BT.tolist() == [[1, 2, 3], [1, 2, 9]]
    assert padded.completion_mask_BT1.tolist() == [[False, True], [True, False]]


def test_pack_to_moves_every_tensor() -> None:
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, token_values={"old": [torch.ones(2), torch.ones(2)]})
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.input_ids_BT, batch.input_ids_BT)
    assert torch.equal(moved.values_BT1["old"], batch.values_BT1["old"])
    assert moved.rows == batch.rows


def test_length_buckets_by_count() -> None:
    # Longest first; ties keep input order (stable sort): 1 (9), 3 (9), 0 (5), 2 (3), 4 (1).
    assert length_buckets([5, 9, 3, 9, 1], micro_batch_size=2) == [[1, 3], [0, 2], [4]]
    assert length_buckets([5, 9, 3, 9, 1], micro_batch_size=10) == [[1, 3, 0, 2, 4]]
    assert length_buckets([5, 9, 3], micro_batch_size=1) == [[1], [0], [2]]
    assert length_buckets([], micro_batch_size=4) == []


def test_length_buckets_by_tokens() -> None:
    # max_tokens=12: 2 x 9 > 12, so each 9 alone; 0 (5) + 2 (3) pad to 2 x 5 = 10 <= 12; 4 starts a new
    # bucket because the previous one is full (micro_batch_size=2).
    assert length_buckets([5, 9, 3, 9, 1], micro_batch_size=2, max_tokens=12) == [[1], [3], [0, 2], [4]]
    # With room for more rows, 0, 2, 4 fit together: 3 x 5 = 15 <= 15.
    assert length_buckets([5, 9, 3, 9, 1], micro_batch_size=8, max_tokens=15) == [[1], [3], [0, 2, 4]]
    # A sequence longer than max_tokens still gets a micro-batch of its own.
    assert length_buckets([100, 2, 2], micro_batch_size=4, max_tokens=10) == [[0], [1, 2]]


def test_length_buckets_rejects_empty_micro_batches() -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        length_buckets([1, 2], micro_batch_size=0)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), max_size=40),
    micro_batch_size=st.integers(1, 8),
    max_tokens=st.one_of(st.none(), st.integers(1, 200)),
)
def test_length_buckets_invariants(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> None:
    buckets = length_buckets(lengths, micro_batch_size, max_tokens)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for bucket in buckets:
        assert 1 <= len(bucket) <= micro_batch_size
        if max_tokens is not None and len(bucket) > 1:
            assert len(bucket) * max(lengths[i] for i in bucket) <= max_tokens
