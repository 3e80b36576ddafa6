"""What keeps ranks in step, for the update and the warm start alike (docs/algorithm.md §4.5, §6).

- The loss normaliser is computed from each role's tokens and sequences summed over ranks before any backward
  pass (:func:`rank_summed_counts`), so neither the micro-batch split nor the number of ranks changes the gradient.
- Under DDP every backward is a gradient all-reduce, and under FSDP every forward and backward is a collective,
  so a rank that has run out of micro-batches runs zero-weight passes over a one-token dummy sequence, which run
  the same collectives (:func:`lockstep_passes`, :func:`zero_weight_pass`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from spiral_lit.training.batching import PackedBatch, pack

ROLES = ("search", "aggregation")
"""Role 0 and role 1 of a training sequence."""

Bucket = TypeVar("Bucket")
Out = TypeVar("Out")


def rank_summed_counts(
    roles_N: Sequence[int],
    tokens_N: Sequence[int],
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each role's kept tokens and sequences, ``[2]`` float32 each on the CPU, summed over ranks in one all-reduce:
    what :func:`spiral_lit.algorithms.roles.role_normalisers` computes the loss normaliser from.

    ``roles_N`` / ``tokens_N``: the role and the number of trained tokens of each of this rank's sequences.
    """
    tokens = [0.0] * len(ROLES)
    sequences = [0.0] * len(ROLES)
    for role, n_tokens in zip(roles_N, tokens_N, strict=True):
        tokens[role] += n_tokens
        sequences[role] += 1.0
    summed = reduce_sum(torch.tensor([*tokens, *sequences], device=device)).cpu()
    return summed[: len(ROLES)], summed[len(ROLES) :]


def lockstep_passes(
    buckets: Sequence[Bucket],
    run: Callable[[Bucket], Out],
    pad: Callable[[], None],
    reduce_max: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> list[Out]:
    """``run`` on each of this rank's micro-batches, then ``pad`` until it has run as many passes as the busiest
    rank; ``run``'s results.

    The count is agreed before the first pass: DDP's first backwards run collectives too (bucket rebuilding), and
    under FSDP every forward is one.
    """
    busiest = int(reduce_max(torch.tensor(float(len(buckets)), device=device)))
    out = [run(bucket) for bucket in buckets]
    for _ in range(busiest - len(buckets)):
        pad()
    return out


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def dummy_batch(pad_id: int, device: torch.device) -> PackedBatch:
    """One sequence of two pad tokens: the cheapest input that runs every layer of the model."""
    return pack([[pad_id]], [[pad_id]], pad_id).to(device)


def zero_weight_pass(model: Callable[..., Any], batch: PackedBatch, backward: Callable[[torch.Tensor], None]) -> None:
    """A forward and a backward whose gradient is exactly zero (every parameter that the forward used gets
    a zero gradient): the collectives of a real pass (DDP all-reduce, FSDP all-gather and reduce-scatter)
    for a rank that has run out of micro-batches."""
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    backward(logits.float().sum() * 0.0)
