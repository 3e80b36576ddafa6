"""Passes that keep ranks in lockstep: under DDP every backward is a gradient all-reduce, and under FSDP every
forward and backward is a collective, so a rank that has run out of micro-batches runs zero-weight passes
over a one-token dummy sequence, which run the same collectives (update and warm start alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spiral_lit.training.batching import PackedBatch, pack


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
