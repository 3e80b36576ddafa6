"""SpiralModule: online SPIRAL (or GRPO) training of one shared policy.

``training_step`` reads as the numbered phases of docs/algorithm.md §2: (1) search
traces, (2) sets, (3) aggregation traces, (4) verification, (5) advantages, (6) the
policy-gradient update. Each phase is one call into a module with one job; the maths
lives in :mod:`spiral_lit.algorithms`. GRPO (``algorithm: grpo``) skips phases 2-3 and
rewards the search traces directly (§5), on the same code path: phases 2-5 are the
strategy object of :mod:`spiral_lit.training.step_algorithm`, chosen once in ``__init__``.

Where this step departs from the paper (all in docs/algorithm.md §9, each with its reason):

1. Aggregation prompts shuffle the candidates, cut overlong ones in the middle and restate the problem after
   them (§1.2).
2. Rewards come from sandboxed verifier workers with timeouts and strict answer grammars (§2.6).
3. Shapes under which an advantage is always 0 (``n_agg = 1``, greedy sampling) are refused up front (§3.7).
4. Dynamic sampling's refill is bounded by ``max_refill_batches``; an update takes every pending prompt (§3.6).
5. The surrogate (``ppo_clip`` with clip range (0.2, 0.28), or ``reinforce_is``) and gradient clipping at 1.0,
   which the paper does not disclose (§4.2, §4.7).
6. Each role is re-scored at its own sampling temperature, with optional role weights and per-role
   normalisation (§4.1, §4.6); std scaling of advantages is optional and off (§3.4).
7. A sampler that is not the trainer (vLLM, bf16) gets recomputed old log-probs and truncated importance
   weights (§4.3); a KL term, off by default, uses the k3 estimator and, under LoRA, the adapter-off model (§4.4).

Run:  python -m spiral_lit fit --config experiments/quickstart/spiral.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger

from spiral_lit.errors import UserError
from spiral_lit.evaluation.held_out import EvalConfig
from spiral_lit.evaluation.rollout_text import rollout_markdown
from spiral_lit.prompts import PromptConfig
from spiral_lit.reliability.checkpointing import (
    check_checkpoint_matches,
    gather_per_rank,
    own_rank_entry,
)
from spiral_lit.reliability.faults import NonFiniteGuard
from spiral_lit.rollout import Backend, VLLMConfig
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.scaffolds import AggregationRollout, SearchRollout, sample_search, step_seed
from spiral_lit.tasks.base import Problem, Task, answer_keys
from spiral_lit.training.experience import sequences_from_state, sequences_state
from spiral_lit.training.held_out_hooks import HeldOutEvaluation
from spiral_lit.training.optimisation import clip_and_step, configure_policy_optimizers
from spiral_lit.training.step_algorithm import make_algorithm
from spiral_lit.training.step_config import AlgorithmConfig, StepCredit, StepScores
from spiral_lit.training.step_metrics import PhaseTimer, step_metrics
from spiral_lit.training.strategy import (
    data_parallel_mesh,
    sharding_of,
    sync_metrics,
)
from spiral_lit.training.update import PolicyUpdater, TrainSequence, UpdateConfig
from spiral_lit.training.update_config import resolve_for_precision


class SpiralModule(HeldOutEvaluation):
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
            vllm: Engine settings of ``rollout_backend: vllm`` (precision, memory, weight sync; docs/algorithm.md §8.1).
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
        self.algorithm = make_algorithm(self.algo, self.aggregation_sampling)  # SPIRAL or GRPO, decided here only
        self.runtime: PolicyRuntime | None = None
        self.reference: Any = None
        self._policy_updater: PolicyUpdater | None = None
        self.eval_metrics = torch.nn.ModuleDict()
        # Dynamic sampling's buffer: non-empty between steps while refilling, so checkpoints carry it
        # (docs/algorithm.md §3.6, §8.4).
        self._pending: list[TrainSequence] = []
        self._pending_prompts = 0
        self._pending_batches = 0
        self._nonfinite = NonFiniteGuard(self.update_config.max_nonfinite_steps)

    # ----------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.runtime is not None:
            return
        if self.task is None:
            raise UserError("model.task is not set: run through the CLI, which links it from data.task")
        self.runtime = PolicyRuntime(
            self.policy_config,
            self.task,
            self.prompt_config,
            self.verifier_config,
            self.hparams["max_generate_batch"],
            self.hparams["rollout_backend"],
            kl_reference=self.update_config.kl_coef > 0,
            sharding=sharding_of(self),
            device_mesh=data_parallel_mesh(self),
            vllm=self.hparams["vllm"],
        )
        self.policy = self.runtime.model
        self.policy.train()
        # Kept out of the state dict and the optimiser: a frozen copy, or the LoRA model with its adapter off.
        object.__setattr__(self, "reference", self.runtime.reference)

    def configure_optimizers(self) -> Any:
        return configure_policy_optimizers(self, self.optimizer_factory, self.scheduler_factory)

    def _updater(self) -> PolicyUpdater:
        """Built at the first update and kept, so each model's training forward is chosen once per run."""
        if self._policy_updater is None:
            self._policy_updater = self._build_updater()
        return self._policy_updater

    def _build_updater(self) -> PolicyUpdater:
        assert self.runtime is not None
        if isinstance(self.reference, torch.nn.Module) and sharding_of(self) != "fsdp2":
            self.reference.to(self.device)
        config = resolve_for_precision(self.update_config, str(self.trainer.precision))
        chosen_by_precision = config.recompute_old_logprobs and self.update_config.recompute_old_logprobs is None
        if chosen_by_precision and self.global_rank == 0:
            print(
                f"[spiral_lit] precision {self.trainer.precision}: the update recomputes old log-probs and weights "
                f"tokens by truncated importance (cap {config.tis_cap}); train/logprob_abs_diff logs how far "
                "sampler and trainer disagree (update.recompute_old_logprobs: false turns it off)"
            )
        return PolicyUpdater(
            self.policy,
            config,
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
        return step_seed(self.hparams["seed"], batch, self.global_rank, phase)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: list[Problem], batch_idx: int) -> None:
        timer, runtime, algorithm = PhaseTimer(), self.runtime, self.algorithm
        assert runtime is not None
        with timer("weight_sync"):
            runtime.sync_weights()  # (0) a vLLM engine gets the updated weights (lazily)
        with timer("generate"), runtime.gathered():  # a sharded policy is whole while it generates
            search = self._search(batch)  # (1) parallel search traces
            rounds = algorithm.aggregate(runtime.sampler, batch, search, self._step_seed)  # (2-3) sets, aggregations
        with timer("verify"):
            scores = algorithm.verify(runtime.verifier, batch, search, rounds)  # (4) rewards
        credit = algorithm.advantages(search, rounds, scores)  # (5) advantages
        with timer("update"):
            update_stats = self._update_when_ready(credit, len(batch))  # (6) policy-gradient update
        self._log_step(batch, search, rounds, scores, credit, update_stats, timer.seconds)

    def _search(self, batch: list[Problem]) -> SearchRollout:
        rt = self.runtime
        assert rt is not None  # set by configure_model
        return sample_search(
            rt.engine, rt.renderer, batch, self.algo.n_search, self.search_sampling, self._step_seed(1)
        )

    def _update_when_ready(self, credit: StepCredit, prompts_per_step: int) -> dict[str, float]:
        """Update once enough prompts with signal are pending (dynamic sampling with refill, docs/algorithm.md §3.6)."""
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
        rounds: list[AggregationRollout],
        scores: StepScores,
        credit: StepCredit,
        update_stats: dict[str, float],
        seconds: dict[str, float],
    ) -> None:
        assert self.runtime is not None
        keys = answer_keys(self.runtime.verifier.task, batch, scores.search.extracted)  # equivalent answers vote as one
        metrics = step_metrics(self.algo.n_search, search, rounds, scores, credit, update_stats, seconds, keys)
        metrics = sync_metrics(metrics, self.trainer.world_size)  # the mean over ranks, logged by rank 0
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        reward = metrics.get("reward/aggregation", metrics["reward/search"])
        self.log("reward", reward, prog_bar=True, batch_size=len(batch))
        if self.global_step % self.hparams["log_rollouts_every_n_steps"] == 1 or self.global_step == 0:
            self._log_rollout_text(batch, search, scores, rounds)

    def _ready_to_update(self, prompts_per_step: int) -> bool:
        ready = self._pending_prompts >= prompts_per_step or self._pending_batches > self.algo.max_refill_batches
        # Every rank must take the same decision, or the gradient all-reduce would wait forever.
        flag = torch.tensor(float(ready), device=self.device)
        return bool(self.trainer.strategy.reduce(flag, reduce_op="min") > 0.5)

    def _update(self, sequences: list[TrainSequence]) -> dict[str, float]:
        def step() -> None:
            # A NaN/Inf gradient skips the step and is counted; too many in a row stop the run (docs/algorithm.md §8.4).
            clip_and_step(self, self.update_config.max_grad_norm, self._nonfinite)

        # With no sequence (every prompt dropped) the step still runs, so ranks and step counts stay aligned.
        stats = self._updater().update(sequences, self.manual_backward, step, self.device, self._step_seed(6))
        return stats | {"sequences": float(len(sequences)), "nonfinite_steps": float(self._nonfinite.total)}

    def _log_rollout_text(
        self, batch: list[Problem], search: SearchRollout, scores: StepScores, rounds: list[AggregationRollout]
    ) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            assert self.runtime is not None  # set by configure_model
            text = rollout_markdown(
                self.runtime.tokenizer, batch[0], search, scores.search_BN, rounds, scores.rewards_BKA
            )
            self.logger.experiment.add_text("rollouts", text, self.global_step)

    # ----------------------------------------------------------------- evaluation
    def eval_samplings(self) -> tuple[SamplingConfig, SamplingConfig]:
        """Each role is evaluated with the sampling settings it trains with."""
        return self.search_sampling, self.aggregation_sampling

    def teardown(self, stage: str) -> None:
        if self.runtime is not None:
            self.runtime.close()

    # ----------------------------------------------------------------- checkpoints (docs/algorithm.md §8.4)
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
