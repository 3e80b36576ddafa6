"""batching.py: packing (prompt, completion) pairs into next-token tensors, and length bucketing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spiral_lit.training.batching import MICRO_BATCH_COST_TOKENS, length_buckets, pack, prefix_buckets

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


def test_length_buckets_keeps_short_rows_out_of_long_micro_batches() -> None:
    # 4 rows of 400 then 4 of 100, room for all 8 (8 x 400 = 3200 <= 4000). One micro-batch costs 3200 + 256;
    # two cost 1600 + 400 + 2 x 256 = 2512, so the short rows get their own.
    assert length_buckets([400] * 4 + [100] * 4, micro_batch_size=8, max_tokens=4000) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Rows that differ by little stay together: [10, 9, 8] pads to 30 + 256, less than any split.
    assert length_buckets([8, 10, 9], micro_batch_size=8) == [[1, 2, 0]]


def greedy_cost(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> int:
    """The cost (padded tokens + MICRO_BATCH_COST_TOKENS per micro-batch) of filling each micro-batch in turn."""
    total, rows, longest = 0, 0, 0
    for length in sorted(lengths, reverse=True):
        if rows and rows < micro_batch_size and (max_tokens is None or (rows + 1) * longest <= max_tokens):
            rows += 1
            continue
        total += rows * longest + (MICRO_BATCH_COST_TOKENS if rows else 0)
        rows, longest = 1, length
    return total + rows * longest + (MICRO_BATCH_COST_TOKENS if rows else 0)


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
    cost = sum(len(b) * max(lengths[i] for i in b) + MICRO_BATCH_COST_TOKENS for b in buckets)
    assert cost <= greedy_cost(lengths, micro_batch_size, max_tokens)  # never worse than filling in turn


# Rows 0, 2, 4 share prompt A (4 tokens: a prefix of 3), rows 1, 3 prompt B (2 tokens: a prefix of 1).
A, B = [1, 2, 3, 4], [5, 6]
SHARED_PROMPTS = [A, B, A, B, A]
COMPLETION_LENGTHS = [2, 5, 4, 1, 3]


def test_prefix_buckets_by_count() -> None:
    # Longest prompt first, a prompt's rows together, longest completion first: 2 (4), 4 (3), 0 (2), 1 (5), 3 (1).
    assert prefix_buckets(SHARED_PROMPTS, COMPLETION_LENGTHS, micro_batch_size=10) == [[2, 4, 0, 1, 3]]
    assert prefix_buckets(SHARED_PROMPTS, COMPLETION_LENGTHS, micro_batch_size=2) == [[2, 4], [0, 1], [3]]
    assert prefix_buckets([], [], micro_batch_size=4) == []
    with pytest.raises(ValueError, match="micro_batch_size"):
        prefix_buckets([[1]], [1], micro_batch_size=0)


def test_prefix_buckets_count_the_tokens_run() -> None:
    # Tokens run = distinct prompts x longest prefix + rows x longest completion.
    # [2, 4, 0]: 1 x 3 + 3 x 4 = 15 <= 20; adding 1 (prompt B, completion 5): 2 x 3 + 4 x 5 = 26 > 20.
    # [1, 3]: 1 x 1 + 2 x 5 = 11.
    assert prefix_buckets(SHARED_PROMPTS, COMPLETION_LENGTHS, 8, max_tokens=20) == [[2, 4, 0], [1, 3]]
    # max_tokens=12: [2, 4] = 11; + 0 = 15 > 12, so A continues in a bucket of its own (A encoded twice);
    # [0] + 1: 2 x 3 + 2 x 5 = 16 > 12; [1, 3] = 11.
    assert prefix_buckets(SHARED_PROMPTS, COMPLETION_LENGTHS, 8, max_tokens=12) == [[2, 4], [0], [1, 3]]
    # One-token prompts have an empty prefix: only the suffix counts (2 x 3 = 6 <= 6, 3 x 3 > 6).
    assert prefix_buckets([[7], [7], [7]], [3, 3, 3], 8, max_tokens=6) == [[0, 1], [2]]
    # A row longer than max_tokens still gets a micro-batch of its own.
    assert prefix_buckets([A, B], [100, 1], 8, max_tokens=10) == [[0], [1]]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 30)), max_size=40),
    micro_batch_size=st.integers(1, 8),
    max_tokens=st.one_of(st.none(), st.integers(1, 200)),
)
def test_prefix_buckets_invariants(rows: list[tuple[int, int]], micro_batch_size: int, max_tokens: int | None) -> None:
    """Prompt k has k + 1 tokens (6 distinct prompts); every row once, a prompt's rows adjacent, caps kept."""
    prompts = [list(range(k + 1)) for k, _ in rows]
    completion_lengths = [n for _, n in rows]
    buckets = prefix_buckets(prompts, completion_lengths, micro_batch_size, max_tokens)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(rows)))
    prompt_order = [len(prompts[i]) for i in flat]
    assert prompt_order == sorted(prompt_order, reverse=True)  # longest prompt first, each prompt's rows adjacent
    for bucket in buckets:
        assert 1 <= len(bucket) <= micro_batch_size
        if max_tokens is not None and len(bucket) > 1:
            distinct = {tuple(prompts[i]) for i in bucket}
            tokens = len(distinct) * (max(len(p) for p in distinct) - 1)
            tokens += len(bucket) * max(completion_lengths[i] for i in bucket)
            assert tokens <= max_tokens
