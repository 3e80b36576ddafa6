"""Each role's gradient norm before clipping (``update.role_grad_norms``): the search role's micro-batches run first,
a copy of the gradient is kept, then the aggregation role's run; the aggregation gradient is the difference.
Logged as ``train/grad_norm/{search,aggregation,total}`` with the clip rate (docs/algorithm.md §4.6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from spiral_lit.algorithms.roles import role_grad_sq_norms
from spiral_lit.training.rank_passes import local_shard


def grad_copy(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The current gradient of every parameter that has one, copied (the search role's, before aggregation)."""
    return {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}


def role_grad_norms(
    model: torch.nn.Module,
    search_grads: dict[int, torch.Tensor] | None,
    max_grad_norm: float,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    sharded: bool,
    device: torch.device,
) -> dict[str, float]:
    """Norms of the search, aggregation and total gradients before clipping, and whether the step clips.

    ``search_grads``: :func:`grad_copy` after the search passes; None when no rank had an aggregation sequence
    (the whole gradient is the search role's). ``sharded``: the gradients are sharded over ranks (FSDP), so the
    squared norms are summed over ranks.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    totals = [local_shard(cast(torch.Tensor, p.grad)) for p in params]
    if search_grads is None:
        searches = totals
    else:
        searches = [local_shard(search_grads[id(p)]) if id(p) in search_grads else torch.zeros_like(t)
                    for p, t in zip(params, totals, strict=True)]  # fmt: skip
    sq_3 = role_grad_sq_norms(searches, totals)
    if sharded:
        sq_3 = reduce_sum(sq_3.to(device)).cpu()
    norm_3 = sq_3.sqrt()
    return {
        "grad_norm/search": float(norm_3[0]),
        "grad_norm/aggregation": float(norm_3[1]),
        "grad_norm/total": float(norm_3[2]),
        "clip_rate": float(norm_3[2] > max_grad_norm),
    }
