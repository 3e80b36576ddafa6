"""What a rollout needs to know about an FSDP2-sharded policy (sharding itself is ``spiral_lit.runtime.sharding``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def fsdp2_modules(model: torch.nn.Module) -> list[FSDPModule]:
    """The modules of ``model`` that ``fully_shard`` manages (empty if it is not sharded with FSDP2)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def synced_generate(model: torch.nn.Module) -> bool | None:
    """transformers' ``synced_gpus`` for ``model.generate``: False for an FSDP2-sharded policy, else None
    (transformers decides: on for FSDP1, see :func:`spiral_lit.runtime.sharding.mark_lockstep_generate`).

    torch's ``fully_shard`` marks the modules it manages ``_is_fsdp_managed_module``, which transformers reads as
    "forwards are collectives" and answers with an all-reduce after every decode step on every rank. But an FSDP2
    policy only ever generates gathered (:func:`spiral_lit.runtime.sharding.gathered_params`), so its forwards are
    local, and ranks that
    evaluate different numbers of batches (the held-out split is not padded) would wait on each other forever.
    """
    return False if fsdp2_modules(model) else None
