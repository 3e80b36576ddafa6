"""SpiralModule: online SPIRAL (or GRPO) training of one shared policy.

``training_step`` reads as the numbered phases of method.md section 2: (1) search
traces, (2) sets, (3) aggregation traces, (4) verification, (5) advantages, (6) the
policy-gradient update. Each phase is one call into a module with one job; the maths
lives in :mod:`spiral_lit.algorithms`. GRPO (``algorithm: grpo``) skips phases 2-3 and
rewards the search traces directly (section 5), on the same code path.

Run:  python -m spiral_lit fit --config experiments/quickstart/spiral.yaml
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger

from spiral_lit.algorithms import (
    grpo_advantages,
    informative_groups,
    informative_prompts,
    length_gate,
    sample_sets_batch,
    spiral_advantages,
)
from spiral_lit.evaluation.held_out import EvalConfig, evaluate_problems
from spiral_lit.evaluation.predict import predict_problems
from spiral_lit.evaluation.rollout_text import rollout_markdown
from spiral_lit.prompts import PromptConfig
from spiral_lit.reliability.checkpointing import (
    check_checkpoint_matches,
    gather_per_rank,
    own_rank_entry,
)
from spiral_lit.reliability.faults import NonFiniteGuard
from spiral_lit.rollout import Backend, VLLMConfig
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.rollout.vllm_engine import sync_rollout_weights
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.scaffolds import AggregationRollout, SearchRollout, sample_aggregations, sample_search
from spiral_lit.tasks.base import Problem, Task
from spiral_lit.training.cpu_memory import KeepFreedCpuMemory
from spiral_lit.training.experience import (
    aggregation_sequences,
    search_sequences,
    sequences_from_state,
    sequences_state,
)
from spiral_lit.training.optimisation import clip_and_step, configure_policy_optimizers
from spiral_lit.training.step_config import AlgorithmConfig, StepCredit, StepScores
from spiral_lit.training.step_metrics import PhaseTimer, step_metrics
from spiral_lit.training.strategy import (
    HoldGatheredForEvaluation,
    data_parallel_mesh,
    log_eval_metrics,
    sharding_of,
    sync_metrics,
)
from spiral_lit.training.update import PolicyUpdater, TrainSequence, UpdateConfig


def _lengths(traces: list[list[Completion]]) -> torch.Tensor:
    return torch.tensor([[t.num_tokens for t in ts] for ts in traces])


class SpiralModule(L.LightningModule):
    """The shared generator/aggregator policy trained with SPIRAL or GRPO."""

    def __init__(
        self,
        policy: PolicyConfig,
        task: Task | None = None,
        algorithm: AlgorithmConfig | None = None,
        update: UpdateConfig | None = None,
        search_sampling: SamplingConfig | None = None,
        aggregation_sampling: SamplingConfig | None = None,
        prompts: PromptConfig | None = None,
        eval: EvalConfig | None = None,
        verifier: VerifierConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        rollout_backend: Backend = "kv_cache",
        max_generate_batch: int = 256,
        log_rollouts_every_n_steps: int = 50,
        seed: int = 0,
        vllm: VLLMConfig | None = None,
        cpu_keep_freed_memory: bool = True,
    ) -> None:
        """
        Args:
            policy: The model to train (e.g. the warm start's exported directory).
            task: The task; linked from ``data.task`` by the CLI.
            algorithm: SPIRAL or GRPO and the rollout shape.
            update: Loss, clipping, reductions and micro-batching.
            search_sampling: Sampling of search traces (temperature 1.0 in the paper).
            aggregation_sampling: Sampling of aggregation traces.
            prompts: Prompt wording and layout.
            eval: Held-out evaluation (validation/test).
            verifier: Reward computation settings.
            optimizer: Optimiser ``class_path``/``init_args``.
            lr_scheduler: Optional scheduler, stepped after every optimiser step.
            rollout_backend: ``kv_cache`` (own engine, shared-prefix decode), ``hf`` (``model.generate``) or
                ``vllm`` (a colocated vLLM engine, optional extra).
            max_generate_batch: Sequences per generation call (memory).
            log_rollouts_every_n_steps: How often example rollouts go to TensorBoard as text.
            seed: Base of every rollout seed (derived per step and rank).
            vllm: Engine settings of ``rollout_backend: vllm`` (precision, memory, weight sync; issue 10).
            cpu_keep_freed_memory: On CPU, have glibc's malloc reuse freed memory instead of returning it to the
                kernel after every large tensor (spiral_lit/training/cpu_memory.py; ~1.5x faster updates at 50M
                parameters).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["task", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.policy_config = policy
        self.task = task
        self.algo = algorithm or AlgorithmConfig()
        self.update_config = update or UpdateConfig()
        self.search_sampling = search_sampling or SamplingConfig()
        self.aggregation_sampling = aggregation_sampling or SamplingConfig()
        self.prompt_config = prompts or PromptConfig()
        self.eval_config = eval or EvalConfig()
        self.verifier_config = verifier or VerifierConfig()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.runtime: PolicyRuntime | None = None
        self.reference: Any = None
        self.eval_metrics = torch.nn.ModuleDict()
        # Dynamic sampling's buffer: non-empty between steps while refilling, so checkpoints carry it (issue 7).
        self._pending: list[TrainSequence] = []
        self._pending_prompts = 0
        self._pending_batches = 0
        self._nonfinite = NonFiniteGuard(self.update_config.max_nonfinite_steps)

    # ----------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.runtime is not None:
            return
        if self.task is None:
            raise ValueError("model.task is not set: run through the CLI, which links it from data.task")
        self.runtime = PolicyRuntime(
            self.policy_config,
            self.task,
            self.prompt_config,
            self.verifier_config,
            self.hparams.max_generate_batch,
            self.hparams.rollout_backend,
            kl_reference=self.update_config.kl_coef > 0,
            sharding=sharding_of(self),
            device_mesh=data_parallel_mesh(self),
            vllm=self.hparams.vllm,
        )
        self.policy = self.runtime.model
        self.policy.train()
        # Kept out of the state dict and the optimiser: a frozen copy, or the LoRA model with its adapter off.
        object.__setattr__(self, "reference", self.runtime.reference)

    def configure_optimizers(self) -> Any:
        return configure_policy_optimizers(self, self.optimizer_factory, self.scheduler_factory)

    def _updater(self) -> PolicyUpdater:
        assert self.runtime is not None
        if isinstance(self.reference, torch.nn.Module) and sharding_of(self) != "fsdp2":
            self.reference.to(self.device)
        return PolicyUpdater(
            self.policy,
            self.update_config,
            self.runtime.tokenizer.pad_token_id,
            # Each role is re-scored at its own sampling temperature (greedy sampling has no temperature: 1.0).
            (self.search_sampling.temperature or 1.0, self.aggregation_sampling.temperature or 1.0),
            reduce_sum=lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"),
            reduce_max=lambda t: self.trainer.strategy.reduce(t, reduce_op="max"),
            world_size=self.trainer.world_size,
            reference=self.reference,
            sharded=sharding_of(self) != "none",
        )

    def _step_seed(self, phase: int) -> int:
        # By rollout batch, not optimiser step: a batch that waits for a refill, or follows a skipped step, shares
        # its global step with the next one and must not reuse its draws (the batch count is checkpointed).
        batch = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else self.global_step
        return hash((self.hparams.seed, batch, self.global_rank, phase)) % (2**31)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: list[Problem], batch_idx: int) -> None:
        timer = PhaseTimer()
        with timer("weight_sync"):
            sync_rollout_weights(self.runtime.engine)  # (0) a vLLM engine gets the updated weights (lazily)
        with timer("generate"), self.runtime.gathered():  # a sharded policy is whole while it generates
            search = self._search(batch)  # (1) parallel search traces
            sets_BKS = self._sets(len(batch))  # (2) distinct sets of search traces
            agg = self._aggregate(batch, search, sets_BKS)  # (3) aggregation traces per set
        with timer("verify"):
            scores = self._verify(batch, search, agg)  # (4) rewards
        credit = self._advantages(search, agg, scores)  # (5) advantages
        with timer("update"):
            update_stats = self._update_when_ready(credit, len(batch))  # (6) policy-gradient update
        self._log_step(batch, search, agg, scores, credit, update_stats, timer.seconds)

    def _search(self, batch: list[Problem]) -> SearchRollout:
        rt = self.runtime
        return sample_search(
            rt.engine, rt.renderer, batch, self.algo.n_search, self.search_sampling, self._step_seed(1)
        )

    def _sets(self, batch_size: int) -> torch.Tensor | None:
        if self.algo.algorithm != "spiral":
            return None
        generator = torch.Generator().manual_seed(self._step_seed(2))
        return sample_sets_batch(batch_size, self.algo.n_search, self.algo.n_sets, self.algo.set_size, generator)

    def _aggregate(
        self, batch: list[Problem], search: SearchRollout, sets_BKS: torch.Tensor | None
    ) -> AggregationRollout | None:
        if sets_BKS is None:
            return None
        rt = self.runtime
        return sample_aggregations(
            rt.engine, rt.renderer, batch, search.traces, sets_BKS, self.algo.n_agg,
            self.aggregation_sampling, self._step_seed(3),
        )  # fmt: skip

    def _verify(self, batch: list[Problem], search: SearchRollout, agg: AggregationRollout | None) -> StepScores:
        """Score every trace; under SPIRAL the search scores are for monitoring only (method.md section 2.4)."""
        algo, verifier = self.algo, self.runtime.verifier
        search_result = verifier.score(
            [p for p in batch for _ in range(algo.n_search)], [t.text for ts in search.traces for t in ts]
        )
        search_BN = torch.tensor(search_result.rewards).view(len(batch), algo.n_search)
        if agg is None:
            return StepScores(search_result, search_BN)
        agg_texts = [t.text for per_problem in agg.traces for per_set in per_problem for t in per_set]
        agg_result = verifier.score([p for p in batch for _ in range(algo.n_sets * algo.n_agg)], agg_texts)
        rewards_BKA = torch.tensor(agg_result.rewards).view(len(batch), algo.n_sets, algo.n_agg)
        return StepScores(search_result, search_BN, agg_result, rewards_BKA)

    def _advantages(self, search: SearchRollout, agg: AggregationRollout | None, scores: StepScores) -> StepCredit:
        algo = self.algo
        if agg is not None and scores.rewards_BKA is not None:
            search_adv_BN, agg_adv_BKA = spiral_advantages(
                scores.rewards_BKA, agg.sets_BKS, algo.n_search, algo.scale_by_std
            )
            keep_B = informative_prompts(scores.rewards_BKA)
        else:
            search_adv_BN, agg_adv_BKA = grpo_advantages(scores.search_BN, algo.scale_by_std), None
            keep_B = informative_groups(scores.search_BN)
        if algo.length_target is not None:
            search_adv_BN = length_gate(search_adv_BN, _lengths(search.traces), algo.length_target)
            if agg is not None and agg_adv_BKA is not None:
                agg_lengths_BKA = torch.stack([_lengths(per_problem) for per_problem in agg.traces])
                agg_adv_BKA = length_gate(agg_adv_BKA, agg_lengths_BKA, algo.length_target)
        if not algo.drop_zero_signal:
            keep_B = torch.ones_like(keep_B)
        sequences = search_sequences(search, search_adv_BN, keep_B)
        if agg is not None and agg_adv_BKA is not None:
            sequences += aggregation_sequences(agg, agg_adv_BKA, keep_B)
        return StepCredit(search_adv_BN, agg_adv_BKA, keep_B, sequences)

    def _update_when_ready(self, credit: StepCredit, prompts_per_step: int) -> dict[str, float]:
        """Update once enough prompts with signal are pending (dynamic sampling with refill, method.md 3)."""
        self._pending.extend(credit.sequences)
        self._pending_prompts += int(credit.keep_B.sum())
        self._pending_batches += 1
        if not self._ready_to_update(prompts_per_step):
            return {"waiting_for_refill": 1.0}
        drawn = {
            "prompts_drawn": float(self._pending_batches * prompts_per_step),
            "prompts_kept": float(self._pending_prompts),
            "refill_batches": float(self._pending_batches - 1),
        }
        stats = self._update(self._pending)
        self._pending, self._pending_prompts, self._pending_batches = [], 0, 0
        return stats | drawn | {"waiting_for_refill": 0.0}

    def _log_step(
        self,
        batch: list[Problem],
        search: SearchRollout,
        agg: AggregationRollout | None,
        scores: StepScores,
        credit: StepCredit,
        update_stats: dict[str, float],
        seconds: dict[str, float],
    ) -> None:
        metrics = step_metrics(self.algo.n_search, search, agg, scores, credit, update_stats, seconds)
        metrics = sync_metrics(metrics, self.trainer.world_size)  # the mean over ranks, logged by rank 0
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        reward = metrics.get("reward/aggregation", metrics["reward/search"])
        self.log("reward", reward, prog_bar=True, batch_size=len(batch))
        if self.global_step % self.hparams.log_rollouts_every_n_steps == 1 or self.global_step == 0:
            self._log_rollout_text(batch, search, scores, agg)

    def _ready_to_update(self, prompts_per_step: int) -> bool:
        ready = self._pending_prompts >= prompts_per_step or self._pending_batches > self.algo.max_refill_batches
        # Every rank must take the same decision, or the gradient all-reduce would wait forever.
        flag = torch.tensor(float(ready), device=self.device)
        return bool(self.trainer.strategy.reduce(flag, reduce_op="min") > 0.5)

    def _update(self, sequences: list[TrainSequence]) -> dict[str, float]:
        def step() -> None:
            # A NaN/Inf gradient skips the step and is counted; too many in a row stop the run (issue 7).
            clip_and_step(self, self.update_config.max_grad_norm, self._nonfinite)

        # With no sequence (every prompt dropped) the step still runs, so ranks and step counts stay aligned.
        stats = self._updater().update(sequences, self.manual_backward, step, self.device, self._step_seed(6))
        return stats | {"sequences": float(len(sequences)), "nonfinite_steps": float(self._nonfinite.total)}

    def _log_rollout_text(
        self, batch: list[Problem], search: SearchRollout, scores: StepScores, agg: AggregationRollout | None
    ) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            text = rollout_markdown(self.runtime.tokenizer, batch[0], search, scores.search_BN, agg, scores.rewards_BKA)
            self.logger.experiment.add_text("rollouts", text, self.global_step)

    # ----------------------------------------------------------------- evaluation
    def evaluate_batch(self, batch: list[Problem]) -> dict[str, torch.Tensor]:
        """Per-problem values of every configured scaffold (evaluation.py; also used by
        spiral_lit.evaluation.compare)."""
        assert self.runtime is not None
        return evaluate_problems(
            *self.runtime.triple(), batch, self.eval_config, self.search_sampling, self.aggregation_sampling
        )

    def configure_callbacks(self) -> list[L.Callback]:
        keep_freed = [KeepFreedCpuMemory()] if self.hparams.cpu_keep_freed_memory else []
        return [HoldGatheredForEvaluation(), *keep_freed]

    def validation_step(self, batch: list[Problem], batch_idx: int) -> None:
        log_eval_metrics(self, self.eval_metrics, "val", self.evaluate_batch(batch))

    def test_step(self, batch: list[Problem], batch_idx: int) -> None:
        log_eval_metrics(self, self.eval_metrics, "test", self.evaluate_batch(batch))

    def predict_step(self, batch: list[Problem], batch_idx: int) -> list[dict[str, Any]]:
        """Answer records with ``eval.predict_scaffold`` (predict.py); PredictionWriter writes them."""
        assert self.runtime is not None
        return predict_problems(
            *self.runtime.triple(), batch, self.eval_config, self.search_sampling, self.aggregation_sampling
        )

    def teardown(self, stage: str) -> None:
        if self.runtime is not None:
            self.runtime.close()

    # ----------------------------------------------------------------- checkpoints (issue 7)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's pending dynamic-sampling sequences and the non-finite step counter, for an exact resume."""
        mine = {
            "sequences": sequences_state(self._pending),
            "prompts": self._pending_prompts,
            "batches": self._pending_batches,
        }
        checkpoint["spiral_lit"] = {
            "pending_per_rank": gather_per_rank(mine, self.trainer.world_size),
            "nonfinite": self._nonfinite.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another model's checkpoint (naming it); restore what :meth:`on_save_checkpoint` saved."""
        check_checkpoint_matches(checkpoint, self, self._trainer.ckpt_path if self._trainer is not None else None)
        state = checkpoint.get("spiral_lit")
        if state is None:
            return
        self._nonfinite.load_state_dict(state["nonfinite"])
        self._pending, self._pending_prompts, self._pending_batches = [], 0, 0
        per_rank = state["pending_per_rank"]
        if any(entry["sequences"] for entry in per_rank):
            world = self.trainer.world_size
            mine = own_rank_entry(per_rank, self.global_rank, world, "dynamic sampling's pending sequences")
            if mine is not None:
                self._pending = sequences_from_state(mine["sequences"])
                self._pending_prompts, self._pending_batches = int(mine["prompts"]), int(mine["batches"])
