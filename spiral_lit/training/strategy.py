"""What the two LightningModules need to know about the strategy they run under: how it shards the policy, the
mesh to shard over, gathering a sharded policy for evaluation, and metrics averaged over ranks."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
import torchmetrics

from spiral_lit.runtime.policy import PolicyRuntime, Sharding


def sharding_of(module: L.LightningModule) -> Sharding:
    """The sharding of ``module``'s strategy; "none" when no Trainer is attached (a test building the module)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = module._trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    return "fsdp1" if isinstance(strategy, FSDPStrategy) else "none"


def data_parallel_mesh(module: L.LightningModule) -> Any:
    """The mesh to shard the policy over with FSDP2: the data-parallel dimension of ``module.device_mesh``
    (set by ``ModelParallelStrategy``), or None without one."""
    mesh = module.device_mesh
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"trainer.strategy.init_args.tensor_parallel_size={mesh['tensor_parallel'].size()}: spiral_lit shards "
            "the policy with FSDP2 over data-parallel ranks only; set tensor_parallel_size: 1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


class HoldGatheredForEvaluation(L.Callback):
    """Keeps a sharded policy gathered for a whole validation, test or predict epoch
    (:meth:`PolicyRuntime.hold_gathered`); both LightningModules return it from ``configure_callbacks``."""

    def _hold(self, pl_module: L.LightningModule, hold: bool) -> None:
        cast(PolicyRuntime, pl_module.runtime).hold_gathered(hold)  # both modules keep one after configure_model

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, False)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, True)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, False)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, True)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hold(pl_module, False)


def log_eval_metrics(
    module: L.LightningModule, metrics: torch.nn.ModuleDict, stage: str, values: dict[str, torch.Tensor]
) -> None:
    """Average per-problem values with torchmetrics and log them as ``{stage}/{name}``.

    Each metric keeps a sum and a count (float64), summed over ranks when computed, so N processes
    give the mean over all problems that 1 process gives. NaN values (a rate undefined for that
    problem or set, e.g. recovery where the majority was right) are left out of the mean.
    """
    for name, per_problem in values.items():
        key = f"{stage}/{name}"
        slot = key.replace("/", "__").replace("@", "_at_").replace(".", "_")
        if slot not in metrics:
            metrics[slot] = torchmetrics.MeanMetric(nan_strategy="ignore").set_dtype(torch.float64).to(module.device)
        metric = cast(torchmetrics.Metric, metrics[slot])  # every slot holds the MeanMetric made above
        metric.update(per_problem.to(module.device))
        module.log(
            key,
            metric,
            on_step=False,
            on_epoch=True,
            batch_size=len(per_problem),
            metric_attribute=f"eval_metrics.{slot}",
        )


def sync_metrics(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Each metric averaged over the ranks that report it (one ``all_gather_object``); every rank returns the same.

    A rank may lack a key (no sequence of a role left after dynamic sampling, so no loss for it), which is
    why Lightning's per-key ``sync_dist`` (one all-reduce per key, matched by order) cannot be used.
    """
    if world_size == 1 or not torch.distributed.is_initialized():
        return metrics
    gathered: list[dict[str, float]] = [{} for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, metrics)
    return mean_over_ranks(gathered)


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """``{key: mean of the values the ranks reported}``, keys in first-seen order."""
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    return {k: sum(m[k] for m in per_rank if k in m) / sum(k in m for m in per_rank) for k in keys}
