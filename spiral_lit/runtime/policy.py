"""What both LightningModules hold besides their loss: the policy, its prompts, a rollout
engine and a verifier, built once in ``configure_model`` (so sharding strategies see the
model there) and shared by training and evaluation.

The policy is built in one order (docs/algorithm.md §8.3): load (with gradient checkpointing), keep a frozen
copy for the KL reference when one is needed and there is no adapter to switch off, add LoRA,
shard with FSDP2 when Lightning gives the module a device mesh.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import Backend, RolloutEngine, VLLMConfig, check_backend, make_engine
from spiral_lit.rollout.vllm_engine import sync_rollout_weights
from spiral_lit.runtime.lora import AdapterDisabledReference, adapted_model, apply_lora
from spiral_lit.runtime.models import PolicyConfig, load_policy
from spiral_lit.runtime.sharding import gathered_params, mark_lockstep_generate, shard_fsdp2
from spiral_lit.tasks.base import Task
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


@dataclass(frozen=True)
class Sampler:
    """What evaluation samples and scores with (:mod:`spiral_lit.evaluation.held_out`, ``predict``): the rollout
    engine, the prompt renderer and the verifier of one policy, as :attr:`PolicyRuntime.sampler` bundles them."""

    engine: RolloutEngine
    renderer: PromptRenderer
    verifier: Verifier


Sharding = Literal["none", "fsdp1", "fsdp2"]
"""How the strategy shards the policy: not at all (single device, DDP), FSDP1 (``FSDPStrategy``, which wraps the
model after ``configure_model``) or FSDP2 (``ModelParallelStrategy``: we shard it in ``configure_model``)."""


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
            vllm: Settings of the ``vllm`` backend's engine (docs/algorithm.md §8.1).
        """
        check_backend(backend, sharding)  # before the policy is loaded
        self.model: torch.nn.Module  # a transformers PreTrainedModel, or a peft.PeftModel around one
        self.tokenizer: PreTrainedTokenizerBase
        model: torch.nn.Module
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
            self.reference = AdapterDisabledReference(model)  # the same weights, adapter off (docs/algorithm.md §4.4)
        self.task = task
        self.renderer = PromptRenderer(self.tokenizer, prompts, task.answer_instruction)
        # The engine calls the adapted Hugging Face model (LoRA active) with its own forward signature.
        self.engine: RolloutEngine = make_engine(
            backend, cast(PreTrainedModel, adapted_model(model)), self.tokenizer, max_generate_batch, vllm
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
        """Context in which a sharded policy is whole for generation (``runtime.sharding.gathered_params``)."""
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

    @property
    def sampler(self) -> Sampler:
        """The engine, renderer and verifier: what the evaluation functions take."""
        return Sampler(self.engine, self.renderer, self.verifier)

    def sync_weights(self) -> None:
        """Phase 0 of a training step: an engine holding its own copy of the weights (vLLM) gets the updated ones,
        lazily (:func:`spiral_lit.rollout.vllm_engine.sync_rollout_weights`)."""
        sync_rollout_weights(self.engine)

    def close(self) -> None:
        self.verifier.close()
