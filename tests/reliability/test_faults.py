"""Faults during a run (docs/algorithm.md §8.4): a NaN/Inf loss skips the update and is counted, too many in a row
stop the run; a verifier that raises or hangs, and an answer that cannot be parsed, score 0 and are counted in the
logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from faulty_task import FaultyVoteTask
from tiny_run import fit, make_module, scalars

from spiral_lit.reliability.faults import NonFiniteGuard, NonFiniteLossError, grads_are_finite
from spiral_lit.runtime.policy import VerifierConfig
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
from spiral_lit.training.update import UpdateConfig


def test_guard_counts_resets_and_stops_naming_the_key() -> None:
    guard = NonFiniteGuard(2)
    guard.record(False)
    guard.record(True)
    guard.record(False)
    assert (guard.consecutive, guard.total) == (1, 2)
    with pytest.raises(NonFiniteLossError, match=r"2 optimiser steps in a row.*update.max_nonfinite_steps=2"):
        guard.record(False)
    with pytest.raises(ValueError, match="model.max_nonfinite_steps must be >= 1"):
        NonFiniteGuard(0, key="model.max_nonfinite_steps")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_grads_are_finite(bad: float | None) -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(3)
    if bad is not None:
        b.grad = torch.tensor([1.0, bad])
    assert grads_are_finite([a, b]) is (bad is None)


class NaNLossAt(SpiralModule):
    """A SpiralModule whose loss becomes NaN on the training batches in ``bad_batches`` (counted over the run)."""

    bad_batches: frozenset[int] = frozenset()

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if self.trainer.fit_loop.total_batch_idx in self.bad_batches:
            loss = loss * float("nan")
        super().manual_backward(loss, *args, **kwargs)


class FlatWeights(L.Callback):
    """The policy's parameters, flattened, after every training batch."""

    def __init__(self) -> None:
        self.after_batch: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.after_batch.append(torch.cat([p.detach().flatten() for p in pl_module.policy.parameters()]))


def _nan_module(tiny_dir: Path, bad_batches: set[int], max_nonfinite_steps: int = 3) -> NaNLossAt:
    update = UpdateConfig(micro_batch_size=16, max_nonfinite_steps=max_nonfinite_steps)
    # Every prompt kept, so every step has a loss (a random policy often gives a prompt equal rewards).
    algorithm = AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2, drop_zero_signal=False)
    module = make_module(tiny_dir, cls=NaNLossAt, update=update, algorithm=algorithm)
    module.bad_batches = frozenset(bad_batches)
    return module


def test_a_nan_loss_skips_the_step_and_is_logged(tiny_policy, tmp_path: Path) -> None:
    module, weights = _nan_module(tiny_policy.path, {1}), FlatWeights()
    trainer = fit(tmp_path, module, 3, callbacks=[weights])
    after = weights.after_batch
    assert trainer.global_step == 3 and len(after) == 4  # batch 1 did not step, so a fourth batch ran
    assert torch.equal(after[0], after[1])  # the NaN step changed nothing
    assert torch.isfinite(after[-1]).all() and not torch.equal(after[1], after[2])
    logged = scalars(tmp_path, "train/nonfinite_steps")
    assert [v for _, (v,) in sorted(logged.items())] == [0.0, 1.0, 1.0, 1.0]
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}  # AdamW stepped 3 times, not 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # and so did the warm-up


def test_too_many_nan_steps_in_a_row_stop_the_run(tiny_policy, tmp_path: Path) -> None:
    module, weights = _nan_module(tiny_policy.path, set(range(100)), max_nonfinite_steps=2), FlatWeights()
    module.configure_model()
    before = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
    with pytest.raises(NonFiniteLossError, match=r"2 optimiser steps in a row.*update.max_nonfinite_steps=2"):
        fit(tmp_path, module, 5, callbacks=[weights])
    assert len(weights.after_batch) == 1  # stopped during the second batch
    assert torch.equal(before, weights.after_batch[0])
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # a mid-step stop writes no checkpoint


def test_raising_hanging_and_unparseable_answers_score_zero_and_are_logged(tiny_policy, tmp_path: Path) -> None:
    module = make_module(tiny_policy.path, FaultyVoteTask(n_terms=2, digits=2))
    module.verifier_config = VerifierConfig(timeout_s=0.3, num_workers=2)
    fit(tmp_path, module, 1)
    faults = {k: scalars(tmp_path, f"verify/search_{k}")[0][0] for k in ("errors", "timeouts", "unparsed")}
    assert all(n > 0 for n in faults.values()), faults
    assert sum(faults.values()) == 2 * 4  # every search trace (batch 2 x n_search 4) hit one of the faults
    assert scalars(tmp_path, "reward/search")[0] == [0.0]
    assert scalars(tmp_path, "reward/aggregation")[0] == [0.0]
