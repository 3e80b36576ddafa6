"""Faults during a run that must neither corrupt the policy nor go unnoticed (docs/algorithm.md §8.4).

A NaN or Inf loss poisons every weight it touches through one optimiser step, and with Adam
the poison stays in the moment estimates after the loss is finite again. So a step whose
gradients are not all finite is skipped: gradients zeroed, no optimiser or scheduler step,
and counted. A few such steps can be bad luck (one overflowing batch); many in a row mean the
run has diverged, and :class:`NonFiniteGuard` stops it with a message saying what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from spiral_lit.errors import UserError


class NonFiniteLossError(RuntimeError):
    """Raised when too many optimiser steps in a row had a NaN or Inf loss or gradient."""


def grads_are_finite(
    parameters: Iterable[torch.nn.Parameter], reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> bool:
    """Whether every gradient is finite, on every rank.

    ``reduce_max`` takes the max over ranks (the strategy's reduce): sharded gradients differ per rank,
    and every rank must take the same decision or the next collective would wait forever.
    """
    bad = torch.zeros((), dtype=torch.float32)
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 DTensor's own shard
        bad = bad.to(local.device)
        bad = torch.maximum(bad, (~torch.isfinite(local)).any().float())
    if reduce_max is not None:
        bad = reduce_max(bad)
    return not bool(bad > 0)


class NonFiniteGuard:
    """Counts optimiser steps skipped for a non-finite gradient and stops the run after too many in a row."""

    def __init__(self, max_consecutive: int, key: str = "update.max_nonfinite_steps") -> None:
        """
        Args:
            max_consecutive: Skipped steps in a row after which the run stops.
            key: The YAML key that sets ``max_consecutive``, named in the error.
        """
        if max_consecutive < 1:
            raise UserError(f"{key} must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.key = max_consecutive, key
        self.consecutive = 0
        self.total = 0

    def record(self, finite: bool) -> None:
        """Count one optimiser step; raise :class:`NonFiniteLossError` after ``max_consecutive`` bad ones in a row."""
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimiser steps in a row had a NaN or Inf loss or gradient ({self.key}="
                f"{self.max_consecutive}); every one was skipped, so the weights are those of the last good step. "
                "Stopping: lower the learning rate, check the rewards and data, or train in float32/bf16-mixed "
                "instead of float16, then resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
