"""The optimiser of the policy's trainable parameters and one manual-optimisation step (clip, step, schedule),
skipping steps whose gradients are not finite."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch

from spiral_lit.reliability.faults import NonFiniteGuard, grads_are_finite

if TYPE_CHECKING:
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from torch.optim.lr_scheduler import LRScheduler


def configure_policy_optimizers(
    module: L.LightningModule, optimizer_factory: Any, scheduler_factory: Any | None
) -> Any:
    """``configure_optimizers`` of both modules: the YAML's optimiser (and scheduler, stepped per step).

    Only trainable parameters go to the optimiser: with LoRA, the frozen base weights get no optimiser state.
    """
    policy = cast(torch.nn.Module, module.policy)  # both modules hold the policy as ``self.policy``
    optimizer = optimizer_factory([p for p in policy.parameters() if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}


def clip_and_step(module: L.LightningModule, max_grad_norm: float, guard: NonFiniteGuard | None = None) -> bool:
    """One optimiser step under manual optimisation: clip, step, zero the gradients, step the scheduler.

    With a ``guard``, a step whose gradients hold a NaN or Inf (a non-finite loss) is skipped instead: gradients
    zeroed, no optimiser or scheduler step, so ``global_step`` does not advance either; the guard counts it and
    stops the run after too many in a row (docs/algorithm.md §8.4). Under ``16-mixed`` precision the grad scaler
    already skips overflowing steps and must see them to lower its scale, so the guard stands aside. Returns whether
    the optimiser stepped.
    """
    optimizer = cast("LightningOptimizer", module.optimizers())  # configure_policy_optimizers returns one
    if guard is not None and getattr(module.trainer.precision_plugin, "scaler", None) is None:
        strategy = module.trainer.strategy
        finite = grads_are_finite(module.parameters(), lambda t: strategy.reduce(t, reduce_op="max"))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        guard.record(finite)  # raises after too many non-finite steps in a row
        if not finite:
            return False
    # Lightning's manual-optimisation idiom passes the LightningOptimizer; the annotation says Optimizer.
    module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")  # type: ignore[arg-type]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = cast("LRScheduler | None", module.lr_schedulers())  # one, stepped per step, or none
    if scheduler is not None:
        scheduler.step()
    return True
