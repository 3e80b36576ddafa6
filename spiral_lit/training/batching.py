"""Turn (prompt, completion) token lists into padded training tensors.

Both the warm start and the policy-gradient update score completion tokens only. A
sequence is ``prompt + completion``; the logits at position t predict token t+1, so
every per-token tensor here is ``[B, T-1]`` and aligned with ``input_ids[:, 1:]``.
Micro-batches are length-bucketed (sorted by length before chunking) so short traces
are not padded to the longest one in the rollout batch (docs/algorithm.md §8.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBatch:
    """Right-padded sequences and the masks/values aligned with next-token targets."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    targets_BT1: torch.Tensor
    """input_ids[:, 1:]: the token each logit position predicts."""
    completion_mask_BT1: torch.Tensor
    """True where the target is a completion token (the ones we train on)."""
    values_BT1: dict[str, torch.Tensor]
    """Per-completion-token values (e.g. old log-probs) scattered into the target layout."""
    rows: list[int]
    """Indices of these sequences in the caller's list."""

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids_BT.to(device),
            self.attention_mask_BT.to(device),
            self.targets_BT1.to(device),
            self.completion_mask_BT1.to(device),
            {k: v.to(device) for k, v in self.values_BT1.items()},
            self.rows,
        )


def pack(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    token_values: dict[str, Sequence[torch.Tensor]] | None = None,
    rows: list[int] | None = None,
) -> PackedBatch:
    """Right-pad ``prompt + completion`` rows; ``token_values[k][i]`` has one value per completion token."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    comp_mask = torch.zeros((n, width - 1), dtype=torch.bool)
    values = {k: torch.zeros((n, width - 1), dtype=torch.float32) for k in (token_values or {})}
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : len(p) + len(c)] = torch.tensor([*p, *c], dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        start, end = len(p) - 1, len(p) - 1 + len(c)
        comp_mask[i, start:end] = True
        for k, per_seq in (token_values or {}).items():
            values[k][i, start:end] = per_seq[i][: len(c)].float()
    return PackedBatch(input_ids, attention, input_ids[:, 1:], comp_mask, values, rows or list(range(n)))


MICRO_BATCH_COST_TOKENS = 256
"""What :func:`length_buckets` charges for each micro-batch beyond its padded tokens: a forward and backward have a
fixed cost (kernel launches, per-layer Python), so splitting rows of nearly equal length into many micro-batches
saves no time. On the quickstart's tiny model a micro-batch's fixed cost is worth about 150-250 tokens of work."""


def length_buckets(lengths: Sequence[int], micro_batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into micro-batches of similar length, longest first (so an OOM shows early).

    A micro-batch holds at most ``micro_batch_size`` sequences and, when ``max_tokens`` is set, at most
    ``max_tokens`` padded tokens (rows x longest row; a longer sequence gets a micro-batch of its own). Among the
    ways to cut the rows, sorted longest first, into consecutive micro-batches within those limits, this takes the
    one with the fewest padded tokens plus :data:`MICRO_BATCH_COST_TOKENS` per micro-batch (dynamic programming;
    ties go to the longer first micro-batch). Filling each micro-batch in turn instead padded the short search
    examples that follow the long aggregation examples of a quickstart warm-start step to the aggregation length,
    1.28x the real tokens; this cut pads to 1.04x (docs/algorithm.md §8.2).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # cost[i]: the cheapest cut of rows i.. (in sorted order); end[i]: where the micro-batch starting at row i ends.
    cost, end = np.zeros(n + 1, dtype=np.int64), np.full(n + 1, n)
    for i in range(n - 1, -1, -1):
        length = max(lengths[order[i]], 1)
        most = micro_batch_size if max_tokens is None else max(1, min(micro_batch_size, max_tokens // length))
        last = min(n, i + most)
        # Micro-batch i..j-1 for j = last, last-1, ..., i+1: the longest first, so argmin's first hit keeps ties.
        totals = cost[last:i:-1] + np.arange(last - i, 0, -1) * length
        best = int(np.argmin(totals))
        cost[i], end[i] = totals[best] + MICRO_BATCH_COST_TOKENS, last - best
    buckets, i = [], 0
    while i < n:
        buckets.append(order[i : int(end[i])])
        i = int(end[i])
    return buckets


def prefix_buckets(
    prompts: Sequence[Sequence[int]],
    completion_lengths: Sequence[int],
    micro_batch_size: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Indices grouped into micro-batches for the shared-prefix forward (:mod:`spiral_lit.training.prefix_forward`).

    Rows with the same prompt go to the same micro-batch, so the prompt is encoded once for all of them; prompts
    go longest first (an OOM shows early), rows of a prompt longest completion first. A micro-batch holds at most
    ``micro_batch_size`` rows and, when ``max_tokens`` is set, at most ``max_tokens`` tokens as that forward runs
    them: distinct prompts x (longest prompt - 1) + rows x longest completion. A prompt's rows that do not fit
    continue in the next micro-batch (which encodes the prompt again).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    buckets: list[list[int]] = []
    n_prompts = prefix = suffix = 0  # of the last bucket: distinct prompts, longest prompt - 1, longest completion
    for prompt, rows in sorted(groups.items(), key=lambda kv: -len(kv[0])):
        new_prompt = True
        for i in sorted(rows, key=lambda i: -completion_lengths[i]):
            suffix_i = max(completion_lengths[i], 1)
            fits = bool(buckets) and len(buckets[-1]) < micro_batch_size
            if fits and max_tokens is not None:
                # Prompts come longest first, so the bucket's longest prompt is its first one.
                tokens = (n_prompts + new_prompt) * prefix + (len(buckets[-1]) + 1) * max(suffix, suffix_i)
                fits = tokens <= max_tokens
            if fits:
                buckets[-1].append(i)
                n_prompts, suffix = n_prompts + new_prompt, max(suffix, suffix_i)
            else:
                buckets.append([i])
                n_prompts, prefix, suffix = 1, len(prompt) - 1, suffix_i
            new_prompt = False
    return buckets
