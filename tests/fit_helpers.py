"""A short fit of a ``SpiralModule`` through a plain CPU Trainer, and the TensorBoard scalars it logged.

Shared by the integration tests that fit a real model for a step or two (tests/training/test_spiral_module.py,
tests/runtime/test_smollm2.py, tests/rollout/test_vllm_engine.py); the resume and fault tests use tiny_run.py,
which adds checkpoints and the CLI's callbacks.
"""

from __future__ import annotations

import glob

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spiral_lit.training.data import ProblemDataModule
from spiral_lit.training.spiral_module import SpiralModule


def plain_trainer(log_dir: str, max_steps: int, precision: str = "32-true") -> L.Trainer:
    """CPU, TensorBoard under ``log_dir/run``, a log line every step; no checkpoints, validation or progress bar."""
    return L.Trainer(
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        max_steps=max_steps,
        logger=TensorBoardLogger(log_dir, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def tensorboard_scalars(log_dir: str) -> dict[str, list[float]]:
    """Every scalar logged below ``log_dir``, by tag, in event-file order."""
    out: dict[str, list[float]] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents*", recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return out


def fit_moving_every_parameter(
    module: SpiralModule, data: ProblemDataModule, log_dir: str, max_steps: int, precision: str = "32-true"
) -> dict[str, list[float]]:
    """Fit ``module`` for ``max_steps``, assert that every trainable parameter changed; return the scalars."""
    trainer = plain_trainer(log_dir, max_steps, precision)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=data)
    unchanged = [n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    return tensorboard_scalars(log_dir)
