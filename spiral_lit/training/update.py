"""Phase 6 of a step: recompute log-probabilities and update the policy over micro-batches.

Search and aggregation sequences go through one loss (method.md section 4), each with its
scalar advantage and a per-role weight. The normaliser of the loss is computed over the
whole minibatch and summed over ranks before any backward pass, so neither the
micro-batch split nor the number of ranks changes the gradient. The optimiser itself is
stepped by the caller (the LightningModule owns it), through the ``backward`` and
``step`` callables.

Under DDP every backward pass is a gradient all-reduce, and under FSDP every forward and
backward pass is a collective too, so every rank runs as many forward/backward passes of each
kind as the busiest rank: ranks with fewer micro-batches add zero-weight passes over a
one-token dummy sequence (:func:`spiral_lit.training.rank_passes.zero_weight_pass`), which run the same collectives.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from spiral_lit.algorithms import LossType, Reduction, policy_loss, token_entropy, token_logprobs
from spiral_lit.algorithms.losses import truncated_importance_weights
from spiral_lit.algorithms.roles import RoleNormalisation, role_grad_sq_norms, role_normalisers
from spiral_lit.errors import UserError
from spiral_lit.fastpath.fused_prefix import fused_prefix_logits, fused_prefix_refusal
from spiral_lit.rollout.base import Completion
from spiral_lit.training.batching import PackedBatch, length_buckets, pack, prefix_buckets
from spiral_lit.training.prefix_forward import (
    CacheForward,
    SharedPrefixBatch,
    cache_forward,
    pack_shared_prefix,
    shared_prefix_logits,
)
from spiral_lit.training.rank_passes import dummy_batch, local_shard, zero_weight_pass

ROLES = ("search", "aggregation")


@dataclass
class UpdateConfig:
    """The surrogate loss and how a rollout batch is cut into optimiser steps."""

    loss_type: LossType = "ppo_clip"
    """``ppo_clip`` (clipped token ratio) or ``reinforce_is`` (importance-weighted REINFORCE)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    """Asymmetric "clip-higher" range (ppo_clip)."""
    reduction: Reduction = "token_mean"
    """``token_mean`` over all tokens of the minibatch, or ``seq_mean_token_sum_norm`` (Dr.GRPO)."""
    norm_const: float | None = None
    """Fixed normaliser for ``seq_mean_token_sum_norm`` (e.g. the max response length)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimiser steps per epoch."""
    micro_batch_size: int = 32
    """Most sequences per forward/backward (memory), independent of the rollout batch size."""
    micro_batch_tokens: int | None = None
    """Most tokens per forward/backward, as run: rows x longest row, or with ``shared_prefix`` distinct prompts x
    longest prompt + rows x longest completion (each row still holds its prompt's keys/values); None = no limit."""
    shared_prefix: bool = True
    """Encode each distinct prompt once per micro-batch and run its samples' completions on its KV cache
    (spiral_lit/training/prefix_forward.py): same log-probs and gradients, less compute. What it does not support (FSDP,
    sliding-window layers, attention other than eager/sdpa, reentrant checkpointing) uses the full forward, with a
    warning saying why."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the frozen reference policy (paper: 0)."""
    entropy_coef: float = 0.0
    """Entropy bonus (paper: 0)."""
    max_grad_norm: float = 1.0
    recompute_old_logprobs: bool = False
    """Use the trainer's own no-grad log-probs as the old policy instead of the sampler's.
    Needed when sampling and training differ numerically (bf16 autocast, another engine)."""
    tis_cap: float | None = None
    """Truncated importance sampling (issue 10): weight each token's policy-gradient term by
    min(exp(trainer_old - sampler), tis_cap), correcting for a sampler that is not the trainer (a bf16 or stale
    vLLM engine); logs ``train/tis_mean``, ``tis_max``, ``tis_clip_frac``. Needs ``recompute_old_logprobs``."""
    search_weight: float = 1.0
    aggregation_weight: float = 1.0
    role_normalisation: RoleNormalisation = "shared"
    """``shared``: one denominator over both roles' tokens (the paper); ``per_role``: each role's own token mean,
    then the role weights sum them [ours] (spiral_lit/algorithms/roles.py says why)."""
    role_grad_norms: bool = True
    """Log each role's gradient norm before clipping (``train/grad_norm/search``, ``aggregation``, ``total``) and
    the clip rate (``train/clip_rate``): each role's micro-batches run apart, and a copy of the search gradient is
    kept until the optimiser step. Off: the roles share micro-batches and only ``clip_rate`` is not logged."""
    max_nonfinite_steps: int = 3
    """Optimiser steps whose loss or gradient is NaN/Inf are skipped and counted (``train/nonfinite_steps``);
    this many in a row stop the run (issue 7)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "num_minibatches", "micro_batch_size", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"update.{key} must be >= 1, got {getattr(self, key)}")
        if self.reduction == "seq_mean_token_sum_norm" and not self.norm_const:
            raise UserError("update.norm_const must be set (> 0) when update.reduction is 'seq_mean_token_sum_norm'")
        if self.tis_cap is not None and (self.tis_cap <= 0 or not self.recompute_old_logprobs):
            raise UserError(
                f"update.tis_cap={self.tis_cap}: needs a value > 0 and update.recompute_old_logprobs: true (the "
                "weight compares the trainer's recomputed log-probs with the sampler's)"
            )


@dataclass
class TrainSequence:
    """One sampled trace with its credit."""

    prompt_ids: list[int]
    completion: Completion
    advantage: float
    role: int
    """0 = search, 1 = aggregation."""


class PolicyUpdater:
    """Runs the loss over micro-batches; the LightningModule supplies backward and step."""

    def __init__(
        self,
        model: PreTrainedModel,
        config: UpdateConfig,
        pad_id: int,
        temperature: float | tuple[float, float],
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        reduce_max: Callable[[torch.Tensor], torch.Tensor],
        world_size: int,
        reference: Callable[..., Any] | None = None,
        sharded: bool = False,
    ) -> None:
        """
        Args:
            temperature: The sampling temperature of every trace, or one per role (search, aggregation): each
                sequence is scored at the temperature it was sampled with, or the first ratios are off.
            reference: The KL reference policy, called like the model: a frozen copy, or the same LoRA model
                with its adapter disabled (:class:`spiral_lit.runtime.lora.AdapterDisabledReference`).
            sharded: The gradients are sharded over ranks (FSDP), so their norms are summed over ranks.
        """
        self.model, self.config, self.pad_id = model, config, pad_id
        self.temperatures = temperature if isinstance(temperature, tuple) else (temperature, temperature)
        self.reduce_sum, self.reduce_max = reduce_sum, reduce_max
        self.world_size, self.reference, self.sharded = world_size, reference, sharded
        self._tis: list[torch.Tensor] | None = None
        """Per-sequence truncated importance weights of the current update (``tis_cap``)."""
        self._prefix: CacheForward | None = None
        """How to pass the KV cache for the shared-prefix forward; None = the full forward."""
        if config.shared_prefix:
            try:
                self._prefix = cache_forward(model)
            except NotImplementedError as err:
                warnings.warn(f"update.shared_prefix: {err}; using the full forward", stacklevel=2)

    def _pack(self, sequences: list[TrainSequence], rows: list[int]) -> PackedBatch | SharedPrefixBatch:
        chosen = [sequences[i] for i in rows]
        values = {"old": [s.completion.logprobs for s in chosen]}
        if self._tis is not None:
            values["tis"] = [self._tis[i] for i in rows]
        if self._prefix is not None:
            prompts, completions = [s.prompt_ids for s in chosen], [s.completion.token_ids for s in chosen]
            return pack_shared_prefix(prompts, completions, self.pad_id, values, rows)
        return pack([s.prompt_ids for s in chosen], [s.completion.token_ids for s in chosen], self.pad_id, values, rows)

    def _logits(self, model: Callable[..., Any], batch: PackedBatch | SharedPrefixBatch) -> torch.Tensor:
        if isinstance(batch, SharedPrefixBatch):
            assert self._prefix is not None
            if fused_prefix_refusal(model) is None:  # the same logits without per-row prompt copies (issue 8)
                return fused_prefix_logits(model, batch)
            return shared_prefix_logits(model, batch, self._prefix)
        return model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]

    def _buckets(self, sequences: list[TrainSequence], indices: list[int]) -> list[list[int]]:
        """Micro-batches as positions in ``indices``: a prompt's rows together (shared prefix), else by length."""
        cfg, chosen = self.config, [sequences[i] for i in indices]
        if self._prefix is not None:
            prompts, completion_lengths = [s.prompt_ids for s in chosen], [s.completion.num_tokens for s in chosen]
            return prefix_buckets(prompts, completion_lengths, cfg.micro_batch_size, cfg.micro_batch_tokens)
        lengths = [len(s.prompt_ids) + s.completion.num_tokens for s in chosen]
        return length_buckets(lengths, cfg.micro_batch_size, cfg.micro_batch_tokens)

    def _temperatures_B(self, sequences: list[TrainSequence], rows: list[int], device: torch.device) -> torch.Tensor:
        """``[B]`` sampling temperature of each row, by its role."""
        return torch.tensor([self.temperatures[sequences[i].role] for i in rows], device=device)

    def _max_over_ranks(self, count: int, device: torch.device) -> int:
        return int(self.reduce_max(torch.tensor(float(count), device=device)))

    @torch.no_grad()
    def _recompute_old(self, sequences: list[TrainSequence], device: torch.device) -> None:
        buckets = self._buckets(sequences, list(range(len(sequences))))
        for rows in buckets:
            batch = self._pack(sequences, rows).to(device)
            temperature_B = self._temperatures_B(sequences, rows, device)
            logp_BT = token_logprobs(self._logits(self.model, batch), batch.targets_BT1, temperature_B)
            for j, i in enumerate(rows):
                s = sequences[i]
                start = 0 if isinstance(batch, SharedPrefixBatch) else len(s.prompt_ids) - 1
                s.completion.logprobs = logp_BT[j, start : start + s.completion.num_tokens].float().cpu()
        for _ in range(self._max_over_ranks(len(buckets), device) - len(buckets)):
            self._logits(self.model, dummy_batch(self.pad_id, device))  # same forwards (collectives) as the busiest

    def update(
        self,
        sequences: list[TrainSequence],
        backward: Callable[[torch.Tensor], None],
        step: Callable[[], None],
        device: torch.device,
        seed: int,
    ) -> dict[str, float]:
        """All epochs and minibatches over ``sequences``; returns averaged statistics."""
        cfg = self.config
        self._tis, tis_stats = None, {}
        if cfg.recompute_old_logprobs:
            sampler_logprobs = [s.completion.logprobs for s in sequences]  # before the recompute replaces them
            self._recompute_old(sequences, device)
            if cfg.tis_cap is not None and sequences:
                tis_stats = self._importance_weights(sequences, sampler_logprobs, cfg.tis_cap)
        weights = (cfg.search_weight, cfg.aggregation_weight)
        totals: dict[str, float] = {}
        counts: dict[str, float] = {}

        def add(name: str, value: float, weight: float = 1.0) -> None:
            totals[name] = totals.get(name, 0.0) + value * weight
            counts[name] = counts.get(name, 0.0) + weight

        order = list(range(len(sequences)))
        rng = random.Random(seed)
        first = True
        for _ in range(cfg.epochs):
            rng.shuffle(order)
            for m in range(cfg.num_minibatches):
                minibatch = order[m :: cfg.num_minibatches]
                normaliser_R, counts = self._normalisers(sequences, minibatch, device)
                add("normaliser_share/search", counts["search_share"])
                # With per-role gradient norms, every search pass runs before every aggregation pass.
                groups = [[i for i in minibatch if sequences[i].role == r] for r in (0, 1)]
                search_grads = None
                for group, rows_g in enumerate(groups if cfg.role_grad_norms else [minibatch]):
                    for stats in self._passes(sequences, rows_g, normaliser_R, weights, backward, device):
                        for name, (value, n) in stats.items():
                            add(name, value, n)
                            if first and name == "ratio_dev":
                                add("ratio_dev_first_minibatch", value, n)
                    if cfg.role_grad_norms and group == 0 and counts["aggregation_sequences"] > 0:
                        search_grads = self._grad_copy()
                if cfg.role_grad_norms:
                    for name, value in self._grad_norms(search_grads, device).items():
                        add(name, value)
                step()
                first = False
        return {k: totals[k] / max(counts[k], 1e-12) for k in totals} | tis_stats

    def _importance_weights(
        self, sequences: list[TrainSequence], sampler_logprobs: list[torch.Tensor], cap: float
    ) -> dict[str, float]:
        """Sets the per-token truncated importance weights of ``sequences``; returns their statistics."""
        trainer_1N = torch.cat([s.completion.logprobs for s in sequences])[None]
        sampler_1N = torch.cat(sampler_logprobs)[None]
        keep_1N = torch.ones_like(trainer_1N, dtype=torch.bool)
        weights_1N, stats = truncated_importance_weights(trainer_1N, sampler_1N, keep_1N, cap)
        self._tis = list(weights_1N[0].split([s.completion.num_tokens for s in sequences]))
        return {k: float(v) for k, v in stats.items()}

    def _passes(
        self,
        sequences: list[TrainSequence],
        rows: list[int],
        normaliser_R: torch.Tensor,
        weights: tuple[float, float],
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> list[dict[str, tuple[float, float]]]:
        """Forward/backward over ``rows`` in micro-batches, then zero-weight passes up to the busiest rank's count
        (module docstring); the statistics of each real micro-batch."""
        buckets = self._buckets(sequences, rows)
        n_passes = self._max_over_ranks(len(buckets), device)
        out = [
            self._micro_batch(sequences, [rows[i] for i in bucket], normaliser_R, weights, backward, device)
            for bucket in buckets
        ]
        for _ in range(n_passes - len(buckets)):
            self._zero_weight_micro_batch(backward, device)
        return out

    def _normalisers(
        self, sequences: list[TrainSequence], minibatch: list[int], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each role's loss denominator ``[2]`` over one minibatch, summed over ranks (module docstring), and the
        minibatch's counts: the search tokens' share of all tokens, and the aggregation sequences over ranks."""
        tokens = [0.0, 0.0]
        counts = [0.0, 0.0]
        for i in minibatch:
            tokens[sequences[i].role] += sequences[i].completion.num_tokens
            counts[sequences[i].role] += 1.0
        summed = self.reduce_sum(torch.tensor([*tokens, *counts], device=device)).cpu()
        cfg = self.config
        normaliser_R = role_normalisers(summed[:2], summed[2:], cfg.reduction, cfg.norm_const, cfg.role_normalisation)
        share = float(summed[0] / summed[:2].sum()) if float(summed[:2].sum()) > 0 else 0.0
        return normaliser_R.to(device), {"search_share": share, "aggregation_sequences": float(summed[3])}

    def _grad_copy(self) -> dict[int, torch.Tensor]:
        """The current gradient of every parameter that has one, copied (the search role's, before aggregation)."""
        return {id(p): p.grad.detach().clone() for p in self.model.parameters() if p.grad is not None}

    def _grad_norms(self, search_grads: dict[int, torch.Tensor] | None, device: torch.device) -> dict[str, float]:
        """Norms of the search, aggregation and total gradients before clipping, and whether the step clips."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        totals = [local_shard(p.grad) for p in params]
        if search_grads is None:  # no aggregation sequence on any rank: the whole gradient is the search role's
            searches = totals
        else:
            searches = [local_shard(search_grads[id(p)]) if id(p) in search_grads else torch.zeros_like(t)
                        for p, t in zip(params, totals, strict=True)]  # fmt: skip
        sq_3 = role_grad_sq_norms(searches, totals)
        if self.sharded:
            sq_3 = self.reduce_sum(sq_3.to(device)).cpu()
        norm_3 = sq_3.sqrt()
        return {
            "grad_norm/search": float(norm_3[0]),
            "grad_norm/aggregation": float(norm_3[1]),
            "grad_norm/total": float(norm_3[2]),
            "clip_rate": float(norm_3[2] > self.config.max_grad_norm),
        }

    def _zero_weight_micro_batch(self, backward: Callable[[torch.Tensor], None], device: torch.device) -> None:
        """The forwards (policy, and reference with KL on) and backward of a micro-batch, with zero gradient."""
        batch = dummy_batch(self.pad_id, device)
        if self.config.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                self._logits(self.reference, batch)
        zero_weight_pass(self.model, batch, backward)

    def _micro_batch(
        self,
        sequences: list[TrainSequence],
        rows: list[int],
        normaliser_R: torch.Tensor,
        weights: tuple[float, float],
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> dict[str, tuple[float, float]]:
        cfg = self.config
        batch = self._pack(sequences, rows).to(device)
        logits_BTV = self._logits(self.model, batch)
        temperature_B = self._temperatures_B(sequences, rows, device)
        logp_BT = token_logprobs(logits_BTV, batch.targets_BT1, temperature_B)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy_BT = token_entropy(logits_BTV, temperature_B)
        ref_BT = None
        if cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                ref_BT = token_logprobs(self._logits(self.reference, batch), batch.targets_BT1, temperature_B)
        roles_B = torch.tensor([sequences[i].role for i in rows], device=device)
        adv_B = torch.tensor([sequences[i].advantage for i in rows], device=device, dtype=torch.float32)
        if cfg.role_normalisation == "shared":
            normaliser, weights_B = normaliser_R[0], torch.tensor(weights, device=device)[roles_B]
        else:  # each role's own mean: its weight over its own denominator
            normaliser = torch.ones((), device=device)
            weights_B = (torch.tensor(weights, device=device) / normaliser_R)[roles_B]
        mask_BT = batch.completion_mask_BT1
        loss, stats = policy_loss(
            logp_BT,
            batch.values_BT1["old"],
            adv_B,
            mask_BT,
            normaliser,
            loss_type=cfg.loss_type,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            seq_weights_B=weights_B,
            ref_logprobs_BT=ref_BT,
            kl_coef=cfg.kl_coef,
            entropy_BT=entropy_BT,
            entropy_coef=cfg.entropy_coef,
            token_weights_BT=batch.values_BT1.get("tis"),
        )
        # DDP and FSDP (1 and 2) average gradients over ranks; the normaliser already sums over ranks, so undo
        # the average (tests/training/test_distributed.py checks both against one process).
        backward(loss * self.world_size)
        n = float(mask_BT.sum())
        out = {k: (float(v), n) for k, v in stats.items() if k != "n_tokens"}
        out["loss"] = (float(loss.detach()) * float(normaliser) / max(n, 1.0), n)
        with torch.no_grad():
            for role, name in enumerate(ROLES):
                role_mask = mask_BT & (roles_B == role)[:, None]
                n_role = float(role_mask.sum())
                if n_role:
                    _, role_stats = policy_loss(
                        logp_BT.detach(), batch.values_BT1["old"], adv_B, role_mask, 1.0,
                        loss_type=cfg.loss_type, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        token_weights_BT=batch.values_BT1.get("tis"),
                    )  # fmt: skip
                    out[f"loss/{name}"] = (float(role_stats["pg_loss"]), n_role)
                    out[f"entropy/{name}"] = (float((entropy_BT.detach() * role_mask).sum()) / n_role, n_role)
        return out
