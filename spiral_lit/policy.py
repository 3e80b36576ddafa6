"""What both LightningModules hold besides their loss: the policy, its prompts, a rollout
engine and a verifier, built once in ``configure_model`` (so sharding strategies see the
model there) and shared by training and evaluation.

The policy is built in one order (issue 6): load (with gradient checkpointing), keep a frozen
copy for the KL reference when one is needed and there is no adapter to switch off, add LoRA,
shard with FSDP2 when Lightning gives the module a device mesh.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.evaluation import EvalConfig, evaluate_problems
from spiral_lit.faults import NonFiniteGuard, grads_are_finite
from spiral_lit.lora import AdapterDisabledReference, adapted_model, apply_lora
from spiral_lit.models import PolicyConfig, load_policy
from spiral_lit.predict import predict_problems
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import Backend, RolloutEngine, SamplingConfig, VLLMConfig, make_engine
from spiral_lit.sharding import gathered_params, mark_lockstep_generate, shard_fsdp2
from spiral_lit.tasks.base import Problem, Task
from spiral_lit.tasks.verify import Verifier


@dataclass
class VerifierConfig:
    """How rewards are computed without ever blocking the run."""

    timeout_s: float = 5.0
    """Per-answer limit; a hang scores 0 and is counted."""
    num_workers: int = 1
    """Scoring processes; 0 scores inline (no timeout protection, for debugging)."""
    sandbox: bool = True
    """Run scoring processes with least privilege (scratch directory, no secrets, no file writes, processes or
    sockets); see ``spiral_lit.tasks.sandbox``. Model output is hostile input: turn off only to debug a scorer."""
    memory_limit_mb: int = 8192
    """Address-space limit of each sandboxed scoring process, in MiB; 0 for none."""


Sharding = Literal["none", "fsdp1", "fsdp2"]
"""How the strategy shards the policy: not at all (single device, DDP), FSDP1 (``FSDPStrategy``, which wraps the
model after ``configure_model``) or FSDP2 (``ModelParallelStrategy``: we shard it in ``configure_model``)."""


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
        kl_reference: bool = False,
        sharding: Sharding = "none",
        device_mesh: Any = None,
        vllm: VLLMConfig | None = None,
    ) -> None:
        """
        Args:
            kl_reference: Also provide ``reference``, the frozen starting policy (for a KL penalty).
            sharding: The strategy's sharding (:func:`sharding_of`).
            device_mesh: The data-parallel mesh to shard over with FSDP2 (``sharding="fsdp2"``).
            vllm: Settings of the ``vllm`` backend's engine (issue 10).
        """
        if sharding != "none" and backend != "hf":
            raise ValueError(
                f"model.rollout_backend={backend!r} cannot decode a policy sharded with FSDP ({sharding}): its "
                "decode loop and fused weights assume unsharded modules; set model.rollout_backend: hf"
            )
        self.model: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase
        model, self.tokenizer = load_policy(policy_config)
        frozen = None
        if kl_reference and policy_config.lora is None:
            # Full fine-tuning: the reference is a frozen copy, kept out of the state dict and the optimiser.
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if policy_config.lora is not None:
            model = apply_lora(model, policy_config.lora)
        if sharding == "fsdp2":
            shard_fsdp2(model, device_mesh, policy_config.fsdp2)
            if frozen is not None:
                shard_fsdp2(frozen, device_mesh, policy_config.fsdp2)
        elif sharding == "fsdp1":
            mark_lockstep_generate(model)
        self.model = model
        self.reference: Callable[..., Any] | None = frozen
        if kl_reference and policy_config.lora is not None:
            self.reference = AdapterDisabledReference(model)  # the same weights, adapter off (issue 6)
        self.task = task
        self.renderer = PromptRenderer(self.tokenizer, prompts, task.answer_instruction)
        # The engine calls the adapted Hugging Face model (LoRA active) with its own forward signature.
        self.engine: RolloutEngine = make_engine(
            backend, adapted_model(model), self.tokenizer, max_generate_batch, vllm
        )
        self.verifier = Verifier(
            task,
            timeout_s=verifier.timeout_s,
            num_workers=verifier.num_workers,
            sandbox=verifier.sandbox,
            memory_limit_mb=verifier.memory_limit_mb,
        )
        self._held = ExitStack()

    def gathered(self) -> Any:
        """Context in which a sharded policy is whole for generation (:func:`spiral_lit.sharding.gathered_params`)."""
        return gathered_params(self.model)

    def hold_gathered(self, hold: bool) -> None:
        """Gather the policy for a whole evaluation epoch (``hold=True``), or shard it again (``False``).

        Ranks may evaluate different numbers of batches; gathering once per epoch keeps the collectives
        out of the batches.
        """
        if hold:
            self._held.enter_context(self.gathered())
        else:
            self._held.close()

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


class HoldGatheredForEvaluation(L.Callback):
    """Keeps a sharded policy gathered for a whole validation, test or predict epoch
    (:meth:`PolicyRuntime.hold_gathered`); both LightningModules return it from ``configure_callbacks``."""

    def _hold(self, pl_module: L.LightningModule, hold: bool) -> None:
        pl_module.runtime.hold_gathered(hold)

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
    """``configure_optimizers`` of both modules: the YAML's optimiser (and scheduler, stepped per step).

    Only trainable parameters go to the optimiser: with LoRA, the frozen base weights get no optimiser state.
    """
    optimizer = optimizer_factory([p for p in module.policy.parameters() if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}


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


def clip_and_step(module: L.LightningModule, max_grad_norm: float, guard: NonFiniteGuard | None = None) -> bool:
    """One optimiser step under manual optimisation: clip, step, zero the gradients, step the scheduler.

    With a ``guard``, a step whose gradients hold a NaN or Inf (a non-finite loss) is skipped instead: gradients
    zeroed, no optimiser or scheduler step, so ``global_step`` does not advance either; the guard counts it and
    stops the run after too many in a row (issue 7). Under ``16-mixed`` precision the grad scaler already skips
    overflowing steps and must see them to lower its scale, so the guard stands aside. Returns whether the
    optimiser stepped.
    """
    optimizer = module.optimizers()
    if guard is not None and getattr(module.trainer.precision_plugin, "scaler", None) is None:
        strategy = module.trainer.strategy
        finite = grads_are_finite(module.parameters(), lambda t: strategy.reduce(t, reduce_op="max"))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        guard.record(finite)  # raises after too many non-finite steps in a row
        if not finite:
            return False
    module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()
    return True
