"""Warm start: supervised fine-tuning of the shared policy on worked solutions, both roles.

RL cannot start from a model that never answers correctly, so users run this stage
first. Each training problem becomes, with probability ``search_fraction``, a search
example (search prompt -> worked solution) and, with probability
``aggregation_fraction``, an aggregation example (problem + ``set_size`` candidates, a
random number of them deliberately wrong -> the correct worked solution). Loss:
token-mean cross-entropy on the solution tokens.

Aggregation examples are ~4x longer than search examples, so the quickstart first
trains search alone until it can solve problems, then both roles (two configs).

Under DDP/FSDP each rank builds examples from its own problems; the token count that
normalises the loss is summed over ranks before the backward passes, and every rank runs as
many backward passes as the busiest one, with the update's machinery (:mod:`spiral_lit.training.rank_passes`,
:func:`spiral_lit.algorithms.roles.role_normalisers`), so the gradient is the token mean over the whole global batch.

Run:  python -m spiral_lit fit --config experiments/quickstart/warmstart.yaml
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from spiral_lit.algorithms.roles import role_normalisers
from spiral_lit.errors import UserError
from spiral_lit.evaluation.held_out import EvalConfig
from spiral_lit.prompts import PromptConfig, PromptRenderer, audit_text
from spiral_lit.reliability.checkpointing import check_checkpoint_matches
from spiral_lit.reliability.faults import NonFiniteGuard
from spiral_lit.rollout import Backend
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.rollout.vllm_engine import VLLMConfig
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.scaffolds import derive_rng
from spiral_lit.tasks.base import Problem, Task, has_verdicts
from spiral_lit.training.batching import length_buckets, pack
from spiral_lit.training.forward import full_logits
from spiral_lit.training.held_out_hooks import HeldOutEvaluation
from spiral_lit.training.optimisation import clip_and_step, configure_policy_optimizers
from spiral_lit.training.rank_passes import dummy_batch, lockstep_passes, rank_summed_counts, zero_weight_pass
from spiral_lit.training.strategy import data_parallel_mesh, sharding_of


def warm_start_examples(
    problems: list[Problem],
    task: Task,
    renderer: PromptRenderer,
    set_size: int,
    search_fraction: float,
    aggregation_fraction: float,
    rng: random.Random,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(prompt ids, target ids, role) per example; role 0 = search, 1 = aggregation."""
    prompts, targets, roles = [], [], []
    eos = renderer.tokenizer.eos_token
    for problem in problems:
        if problem.solution is None:
            raise UserError(f"task {task.name!r}: problem {problem.uid} has no worked solution to fine-tune on")
        target = renderer.tokenizer.encode(problem.solution + eos, add_special_tokens=False)
        if rng.random() < search_fraction:
            prompts.append(renderer.search(problem))
            targets.append(target)
            roles.append(0)
        if rng.random() < aggregation_fraction:
            n_right = rng.randint(0, set_size)
            candidates = [problem.solution] * n_right + task.wrong_solutions(problem, set_size - n_right, rng)
            if renderer.config.aggregation_target in ("audit", "select"):
                # Right candidates differ from each other and from the reference where the task allows: the
                # target copies the kept one, which only copying can fit (docs/algorithm.md §6.3).
                candidates[:n_right] = task.right_solutions(problem, n_right, rng)
                prompt, audit = audit_example(problem, candidates, task, renderer, rng)
                prompts.append(prompt)
                targets.append(renderer.tokenizer.encode(audit + eos, add_special_tokens=False))
            else:
                prompts.append(renderer.aggregation_from_texts(problem, candidates, rng))
                targets.append(target)
            roles.append(1)
    return prompts, targets, roles


def audit_example(
    problem: Problem, candidates: list[str], task: Task, renderer: PromptRenderer, rng: random.Random
) -> tuple[list[int], str]:
    """(prompt ids, target text) of an auditing aggregation example (docs/algorithm.md §6.3): the candidates in the
    order shown, a verdict on each as it is shown (after the token cut), then the first right candidate kept and
    copied, or the correct worked solution when none is right. Right means the task's score, not the verdict."""
    assert problem.solution is not None
    ids = [renderer.tokenizer.encode(c, add_special_tokens=False) for c in candidates]
    shown = [renderer.truncate_candidate(ids[i]) for i in renderer.candidate_order(len(ids), rng)]
    verdicts = [task.candidate_verdict(text, problem) for text in shown]
    right = [i for i, text in enumerate(shown) if task.score(task.extract_answer(text) or "", problem) == 1.0]
    kept = right[0] if right else None
    prompt = renderer.aggregation_shown(problem, shown)
    if kept is not None and renderer.config.aggregation_target == "select":  # kept by reference (§6.4)
        return prompt, audit_text(verdicts, kept, "").rstrip()
    return prompt, audit_text(verdicts, kept, problem.solution if kept is None else shown[kept])


def check_audit_targets(task: Task | None, prompts: PromptConfig) -> None:
    """Refuse ``prompts.aggregation_target: audit`` or ``select`` for a task without candidate verdicts, before any
    work."""
    if task is None or prompts.aggregation_target == "solution":
        return
    if not has_verdicts(task):
        raise UserError(
            f"model.prompts.aggregation_target is {prompts.aggregation_target!r}, but task {task.name!r} has no "
            "candidate verdicts (Task.candidate_verdict); use aggregation_target: solution, or a task that checks "
            "candidates (countdown, chain_sum)"
        )


class WarmStartModule(HeldOutEvaluation):
    """Supervised warm start of the policy on both roles; evaluated like the RL module."""

    def __init__(
        self,
        policy: PolicyConfig,
        task: Task | None = None,
        prompts: PromptConfig | None = None,
        search_fraction: float = 1.0,
        aggregation_fraction: float = 0.5,
        set_size: int = 4,
        micro_batch_size: int = 64,
        micro_batch_tokens: int | None = 8192,
        max_grad_norm: float = 1.0,
        eval: EvalConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        verifier: VerifierConfig | None = None,
        rollout_backend: Backend = "kv_cache",
        vllm: VLLMConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        max_nonfinite_steps: int = 3,
        cpu_keep_freed_memory: bool = True,
    ) -> None:
        """
        Args:
            policy: The model to fine-tune (the tiny model's directory in the quickstart).
            task: The task; linked from ``data.task`` by the CLI.
            prompts: Prompt wording and layout, the same as in RL.
            search_fraction: Probability that a problem yields a search example.
            aggregation_fraction: Probability that a problem yields an aggregation example.
            set_size: Candidates per aggregation example.
            micro_batch_size: Most sequences per forward/backward (length-bucketed).
            micro_batch_tokens: Most padded tokens per forward/backward; None = no limit.
            max_grad_norm: Gradient clipping by global norm.
            eval: Held-out evaluation (validation/test).
            eval_sampling: Sampling for evaluation traces (both roles).
            verifier: Reward computation settings.
            rollout_backend: Engine for evaluation rollouts: ``kv_cache``, ``hf`` or ``vllm``.
            vllm: Engine settings of ``rollout_backend: vllm`` (docs/algorithm.md §8.1).
            optimizer: Optimiser ``class_path``/``init_args``.
            lr_scheduler: Optional scheduler ``class_path``/``init_args`` (stepped every step).
            seed: Seed of the example mixing.
            max_nonfinite_steps: Steps whose loss or gradient is NaN/Inf are skipped and counted
                (``train/nonfinite_steps``); this many in a row stop the run (docs/algorithm.md §8.4).
            cpu_keep_freed_memory: On CPU, have glibc's malloc reuse freed memory instead of returning it to the
                kernel after every large tensor (spiral_lit/training/cpu_memory.py; ~1.5x faster updates at 50M
                parameters).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["task", "optimizer", "lr_scheduler"])
        for key, value in {"search_fraction": search_fraction, "aggregation_fraction": aggregation_fraction}.items():
            if not 0.0 <= value <= 1.0:
                raise UserError(f"model.{key} must be in [0, 1], got {value}")
        if search_fraction == aggregation_fraction == 0.0:
            raise UserError("model.search_fraction and model.aggregation_fraction are both 0: nothing to train on")
        self.policy_config = policy
        self.task = task
        self.prompt_config = prompts or PromptConfig()
        if aggregation_fraction > 0:
            check_audit_targets(task, self.prompt_config)
        self.eval_config = eval or EvalConfig()
        self.eval_sampling = eval_sampling or SamplingConfig()
        self.verifier_config = verifier or VerifierConfig()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.runtime: PolicyRuntime | None = None
        self.eval_metrics = torch.nn.ModuleDict()
        self.automatic_optimization = False
        self._nonfinite = NonFiniteGuard(max_nonfinite_steps, key="model.init_args.max_nonfinite_steps")

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
            backend=self.hparams["rollout_backend"],
            sharding=sharding_of(self),
            device_mesh=data_parallel_mesh(self),
            vllm=self.hparams["vllm"],
        )
        self.policy = self.runtime.model
        self.policy.train()

    def configure_optimizers(self) -> Any:
        return configure_policy_optimizers(self, self.optimizer_factory, self.scheduler_factory)

    def examples(self, batch: list[Problem]) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """This rank's (prompt ids, target ids, role) for ``batch``, drawn with a seed of (seed, rank, step)."""
        assert self.runtime is not None
        rng = derive_rng(self.hparams["seed"], self.global_rank, self.global_step)
        return warm_start_examples(
            batch,
            self.runtime.task,
            self.runtime.renderer,
            self.hparams["set_size"],
            self.hparams["search_fraction"],
            self.hparams["aggregation_fraction"],
            rng,
        )

    def training_step(self, batch: list[Problem], batch_idx: int) -> None:
        assert self.runtime is not None
        start = time.perf_counter()
        prompts, targets, roles = self.examples(batch)
        strategy, device = self.trainer.strategy, self.device
        # The token mean over the whole global batch (module docstring): the normaliser is summed over ranks, and
        # DDP/FSDP average the gradients, so each rank's loss is scaled by the world size.
        tokens_R, sequences_R = rank_summed_counts(
            roles, [len(t) for t in targets], lambda t: strategy.reduce(t, reduce_op="sum"), device
        )
        normaliser = role_normalisers(tokens_R, sequences_R, "token_mean", None, "shared")[0].to(device)
        scale = self.trainer.world_size / normaliser
        role_loss = torch.zeros(2, device=device)
        role_tokens = torch.zeros(2, device=device)
        pad_id = self.runtime.tokenizer.pad_token_id

        def run(rows: list[int]) -> None:
            packed = pack([prompts[i] for i in rows], [targets[i] for i in rows], pad_id).to(device)
            nll_BT = F.cross_entropy(full_logits(self.policy, packed).float().transpose(1, 2), packed.targets_BT1,
                                     reduction="none")  # fmt: skip
            mask = packed.completion_mask_BT1
            per_seq_B = (nll_BT * mask).sum(1)
            role_B = torch.tensor([roles[i] for i in rows], device=device)
            role_loss.index_add_(0, role_B, per_seq_B.detach())
            role_tokens.index_add_(0, role_B, mask.sum(1).float())
            # Token mean over the whole batch, so the micro-batch split does not change the gradient.
            self.manual_backward(per_seq_B.sum() * scale)

        def pad() -> None:  # each backward is a collective under DDP/FSDP
            zero_weight_pass(self.policy, dummy_batch(pad_id, device), self.manual_backward)

        lengths = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
        buckets = length_buckets(lengths, self.hparams["micro_batch_size"], self.hparams["micro_batch_tokens"])
        lockstep_passes(buckets, run, pad, lambda t: strategy.reduce(t, reduce_op="max"), device)
        # A NaN/Inf step is skipped and counted (docs/algorithm.md §8.4).
        clip_and_step(self, self.hparams["max_grad_norm"], self._nonfinite)
        self._log_losses(role_loss, role_tokens)
        self.log("train/tokens_per_s", sum(lengths) / (time.perf_counter() - start))  # this rank's
        self.log("train/nonfinite_steps", float(self._nonfinite.total))

    def _log_losses(self, role_loss: torch.Tensor, role_tokens: torch.Tensor) -> None:
        """Token means over all ranks: the sums are reduced, then divided."""
        role_loss = self.trainer.strategy.reduce(role_loss, reduce_op="sum")
        role_tokens = self.trainer.strategy.reduce(role_tokens, reduce_op="sum").clamp(min=1)
        self.log("train/loss", role_loss.sum() / role_tokens.sum(), prog_bar=True)
        self.log("train/loss_search", role_loss[0] / role_tokens[0])
        self.log("train/loss_aggregation", role_loss[1] / role_tokens[1])

    def eval_samplings(self) -> tuple[SamplingConfig, SamplingConfig]:
        """Both roles are evaluated with ``eval_sampling`` (a warm start samples nothing in training)."""
        return self.eval_sampling, self.eval_sampling

    def teardown(self, stage: str) -> None:
        if self.runtime is not None:
            self.runtime.close()

    # ----------------------------------------------------------------- checkpoints (docs/algorithm.md §8.4)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["spiral_lit"] = {"nonfinite": self._nonfinite.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another model's checkpoint, naming it; restore the non-finite step counter."""
        check_checkpoint_matches(checkpoint, self, self._trainer.ckpt_path if self._trainer is not None else None)
        if "spiral_lit" in checkpoint:
            self._nonfinite.load_state_dict(checkpoint["spiral_lit"]["nonfinite"])
