"""Sharding the policy with FSDP2 and gathering it for rollouts (docs/algorithm.md §8.3).

Under Lightning's ``ModelParallelStrategy`` the LightningModule shards its own model in
``configure_model``: :func:`shard_fsdp2` applies ``fully_shard`` to every decoder layer (the
classes the Hugging Face model lists in ``_no_split_modules``), then to the model as root.
Every forward of a sharded model all-gathers each layer's parameters, a collective that all
ranks must enter together; but ranks decode independently (each stops when its own traces
end) and evaluate different numbers of problems. :func:`gathered_params` therefore unshards
every layer once, keeps the parameters gathered through all the rollout's forwards (no
collective inside them), and reshards afterwards, so the sharded memory saving holds for the
update and the full parameters exist only while generating.

FSDP1 (Lightning's ``FSDPStrategy``, GPU only) wraps the model itself; its forwards stay
collective, so :func:`mark_lockstep_generate` makes ``model.generate`` keep ranks in step
(transformers' ``synced_gpus``); :func:`spiral_lit.rollout.fsdp.synced_generate` turns that off for FSDP2, whose
rollouts run gathered.

This file knows torch and nothing of Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh

from spiral_lit.rollout.fsdp import fsdp2_modules

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class Fsdp2Settings:
    """How ``ModelParallelStrategy`` shards the policy (ignored by every other strategy)."""

    param_dtype: Dtype | None = None
    """Dtype of the gathered parameters used in forward/backward (FSDP2 mixed precision); the sharded
    parameters and the optimiser stay in ``policy.dtype``. None = ``policy.dtype``. ``bfloat16`` with
    ``policy.dtype: float32`` is the usual GPU setting."""
    reduce_dtype: Dtype | None = "float32"
    """Dtype of the gradient reduce-scatter; None = ``param_dtype``."""
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward (re-gathered in backward): less memory,
    one more all-gather per layer."""


def _dtype(name: Dtype | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model: the one inside a ``peft.PeftModel``, else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules whose class the model lists in ``_no_split_modules``."""
    hf_model = _hf_model(model)
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(hf_model).__name__} names no decoder-layer class in _no_split_modules ({sorted(names)}), "
            "so there is nothing to shard layer by layer"
        )
    return layers


def shard_fsdp2(model: torch.nn.Module, mesh: DeviceMesh, settings: Fsdp2Settings) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the Hugging Face model as root; in place, returns ``model``.

    The root is the Hugging Face model even inside a ``PeftModel`` (which holds no parameters of its own),
    so the rollout engine, which calls that model directly, runs the root's hooks too.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(
        param_dtype=_dtype(settings.param_dtype), reduce_dtype=_dtype(settings.reduce_dtype)
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=settings.reshard_after_forward)
    root = _hf_model(model)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=settings.reshard_after_forward)
    for m in fsdp2_modules(model):
        # Our own marker on torch's FSDPModule, read back (restored) by gathered_params.
        m._spiral_reshard_after_forward = settings.reshard_after_forward  # type: ignore[attr-defined]
    return model


@contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every FSDP2-sharded parameter of ``model`` is whole on every rank and no forward
    runs a collective; on exit the parameters are sharded again. A no-op for an unsharded model.

    Entering and leaving are collectives (one all-gather per layer), so every rank must do both.
    """
    modules = fsdp2_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for m in modules:
            m.set_reshard_after_forward(getattr(m, "_spiral_reshard_after_forward", True))


def mark_lockstep_generate(model: torch.nn.Module) -> None:
    """Make ``model.generate`` keep all ranks decoding until every rank is done (transformers' ``synced_gpus``).

    transformers turns ``synced_gpus`` on for models it sharded itself, recognised by this attribute; FSDP1
    under Lightning wraps the layers but not the Hugging Face model object the engine calls.
    """
    hf_model = _hf_model(model)
    # A plain bool attribute: nn.Module.__setattr__ is typed for tensors and modules only.
    hf_model._is_fsdp_managed_module = True  # type: ignore[assignment]
