"""What both LightningModules hold besides their loss: the policy, its prompts, a rollout
engine and a verifier, built once in ``configure_model`` (so sharding strategies see the
model there) and shared by training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torchmetrics
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.evaluation import EvalConfig, evaluate_problems
from spiral_lit.models import PolicyConfig, load_policy
from spiral_lit.predict import predict_problems
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import Backend, RolloutEngine, SamplingConfig, make_engine
from spiral_lit.tasks.base import Problem, Task
from spiral_lit.tasks.verify import Verifier


@dataclass
class VerifierConfig:
    """How rewards are computed without ever blocking the run."""

    timeout_s: float = 5.0
    """Per-answer limit; a hang scores 0 and is counted."""
    num_workers: int = 1
    """Scoring processes; 0 scores inline (no timeout protection, for debugging)."""


class PolicyRuntime:
    """The loaded policy with everything needed to sample from it and score the samples."""

    def __init__(
        self,
        policy_config: PolicyConfig,
        task: Task,
        prompts: PromptConfig,
        verifier: VerifierConfig,
        max_generate_batch: int = 256,
        backend: Backend = "kv_cache",
    ) -> None:
        self.model: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase
        self.model, self.tokenizer = load_policy(policy_config)
        self.task = task
        self.renderer = PromptRenderer(self.tokenizer, prompts, task.answer_instruction)
        self.engine: RolloutEngine = make_engine(backend, self.model, self.tokenizer, max_generate_batch)
        self.verifier = Verifier(task, timeout_s=verifier.timeout_s, num_workers=verifier.num_workers)

    def evaluate(
        self,
        problems: list[Problem],
        config: EvalConfig,
        search_sampling: SamplingConfig,
        aggregation_sampling: SamplingConfig,
    ) -> dict[str, torch.Tensor]:
        """Per-problem metric values of every configured scaffold (:mod:`spiral_lit.evaluation`)."""
        return evaluate_problems(
            self.engine, self.renderer, self.verifier, problems, config, search_sampling, aggregation_sampling
        )

    def predict(
        self,
        problems: list[Problem],
        config: EvalConfig,
        search_sampling: SamplingConfig,
        aggregation_sampling: SamplingConfig,
    ) -> list[dict[str, Any]]:
        """One answer record per problem with ``config.predict_scaffold`` (:mod:`spiral_lit.predict`)."""
        return predict_problems(
            self.engine, self.renderer, self.verifier, problems, config, search_sampling, aggregation_sampling
        )

    def close(self) -> None:
        self.verifier.close()


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
        metric = metrics[slot]
        metric.update(per_problem.to(module.device))
        module.log(
            key,
            metric,
            on_step=False,
            on_epoch=True,
            batch_size=len(per_problem),
            metric_attribute=f"eval_metrics.{slot}",
        )


def configure_policy_optimizers(
    module: L.LightningModule, optimizer_factory: Any, scheduler_factory: Any | None
) -> Any:
    """``configure_optimizers`` of both modules: the YAML's optimiser (and scheduler, stepped per step)."""
    optimizer = optimizer_factory(module.policy.parameters())
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}


def clip_and_step(module: L.LightningModule, max_grad_norm: float) -> None:
    """One optimiser step under manual optimisation: clip, step, zero the gradients, step the scheduler."""
    optimizer = module.optimizers()
    module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()
