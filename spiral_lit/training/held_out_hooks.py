"""The evaluation hooks both policy modules share: ``validate``, ``test`` and ``predict`` run the held-out
scaffolds (:mod:`spiral_lit.evaluation.held_out`) with the module's own sampling settings, so a warm start and an
RL checkpoint are evaluated by the same code."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch

from spiral_lit.evaluation.held_out import EvalConfig, evaluate_problems
from spiral_lit.evaluation.predict import predict_problems
from spiral_lit.reliability.progress import report_phase
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.policy import PolicyRuntime
from spiral_lit.tasks.base import Problem
from spiral_lit.training.cpu_memory import KeepFreedCpuMemory
from spiral_lit.training.strategy import HoldGatheredForEvaluation, log_eval_metrics


class HeldOutEvaluation(L.LightningModule):
    """A policy module's evaluation steps. Subclasses set ``runtime`` (in ``setup``), ``eval_config``,
    ``eval_metrics`` and the ``cpu_keep_freed_memory`` hyperparameter, and say which sampling settings each role
    is evaluated with."""

    runtime: PolicyRuntime | None
    eval_config: EvalConfig
    eval_metrics: torch.nn.ModuleDict

    def eval_samplings(self) -> tuple[SamplingConfig, SamplingConfig]:
        """(search, aggregation) sampling settings of evaluation."""
        raise NotImplementedError

    def evaluate_batch(self, batch: list[Problem]) -> dict[str, torch.Tensor]:
        """Per-problem values of every configured scaffold (also used by spiral_lit.evaluation.compare)."""
        assert self.runtime is not None
        search, aggregation = self.eval_samplings()
        return evaluate_problems(
            self.runtime.sampler, batch, self.eval_config, search, aggregation, partial(report_phase, self._trainer)
        )

    def configure_callbacks(self) -> list[L.Callback]:
        keep_freed = [KeepFreedCpuMemory()] if self.hparams["cpu_keep_freed_memory"] else []
        return [HoldGatheredForEvaluation(), *keep_freed]

    def validation_step(self, batch: list[Problem], batch_idx: int) -> dict[str, torch.Tensor]:
        """Logs the batch's evaluation metrics and returns their per-problem values, which Lightning hands to
        callbacks' ``on_validation_batch_end`` (``compare`` pairs checkpoints over problems with them)."""
        values = self.evaluate_batch(batch)
        log_eval_metrics(self, self.eval_metrics, "val", values)
        return values

    def test_step(self, batch: list[Problem], batch_idx: int) -> None:
        log_eval_metrics(self, self.eval_metrics, "test", self.evaluate_batch(batch))

    def predict_step(self, batch: list[Problem], batch_idx: int) -> list[dict[str, Any]]:
        """Answer records with ``eval.predict_scaffold`` (:mod:`spiral_lit.evaluation.predict`);
        PredictionWriter writes them."""
        assert self.runtime is not None
        search, aggregation = self.eval_samplings()
        return predict_problems(self.runtime.sampler, batch, self.eval_config, search, aggregation)
