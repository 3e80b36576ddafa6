"""Phase 6 of a step: recompute log-probabilities and update the policy over micro-batches.

Search and aggregation sequences go through one loss (docs/algorithm.md §4), each with its
scalar advantage and a per-role weight. The normaliser of the loss is computed over the
whole minibatch and summed over ranks before any backward pass, so neither the
micro-batch split nor the number of ranks changes the gradient. The optimiser itself is
stepped by the caller (the LightningModule owns it), through the ``backward`` and
``step`` callables.

Under DDP every backward pass is a gradient all-reduce, and under FSDP every forward and
backward pass is a collective too, so every rank runs as many forward/backward passes of each
kind as the busiest rank: ranks with fewer micro-batches add zero-weight passes over a
one-token dummy sequence (:mod:`spiral_lit.training.rank_passes`, shared with the warm start), which run the same
collectives. Each model's forward (fused shared prefix, shared prefix or full) is chosen once, when the updater is
built (:mod:`spiral_lit.training.forward`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spiral_lit.algorithms import policy_loss, token_entropy, token_logprobs
from spiral_lit.algorithms.losses import truncated_importance_weights
from spiral_lit.algorithms.roles import role_normalisers
from spiral_lit.rollout.base import Completion
from spiral_lit.training.batching import PackedBatch, length_buckets, pack, prefix_buckets
from spiral_lit.training.forward import full_logits, shared_prefix_cache, training_forward
from spiral_lit.training.grad_norms import grad_copy, role_grad_norms
from spiral_lit.training.prefix_forward import SharedPrefixBatch, pack_shared_prefix
from spiral_lit.training.rank_passes import (
    ROLES,
    dummy_batch,
    lockstep_passes,
    rank_summed_counts,
    zero_weight_pass,
)
from spiral_lit.training.update_config import UpdateConfig

__all__ = ["PolicyUpdater", "TrainSequence", "UpdateConfig"]

Stats = dict[str, tuple[float, float]]
"""Statistics of one micro-batch: name -> (mean, weight), weight = its kept tokens."""


@dataclass
class TrainSequence:
    """One sampled trace with its credit."""

    prompt_ids: list[int]
    completion: Completion
    advantage: float
    role: int
    """0 = search, 1 = aggregation."""


_MAXIMA = frozenset({"tis_max"})
"""Statistics whose value over an update is the largest over its micro-batches, not their mean."""


class _WeightedMeans:
    """Weighted means (maxima for :data:`_MAXIMA`) of statistics over an update's micro-batches and minibatches."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        if name in _MAXIMA:
            self.totals[name], self.weights[name] = max(self.totals.get(name, value), value), 1.0
            return
        self.totals[name] = self.totals.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.totals[k] / max(self.weights[k], 1e-12) for k in self.totals}


class PolicyUpdater:
    """Runs the loss over micro-batches; the LightningModule supplies backward and step."""

    def __init__(
        self,
        model: torch.nn.Module,
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
            model: The policy: a transformers ``PreTrainedModel``, or a ``peft.PeftModel`` around one.
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
        self._old_from_forward = bool(config.recompute_old_logprobs) and config.epochs * config.num_minibatches == 1
        """One optimiser step per update: its own forward, detached, is the trainer's old policy (no recompute)."""
        self._prefix = shared_prefix_cache(model, config.shared_prefix)
        """How to pass the KV cache for the shared-prefix forward; None = the full forward."""
        self._forward = training_forward(model, self._prefix)
        self._reference_forward = training_forward(reference, self._prefix) if reference is not None else None

    def _pack(self, sequences: list[TrainSequence], rows: list[int]) -> PackedBatch | SharedPrefixBatch:
        chosen = [sequences[i] for i in rows]
        values: dict[str, Sequence[torch.Tensor]] = {"old": [s.completion.logprobs for s in chosen]}
        if self._tis is not None:
            values["tis"] = [self._tis[i] for i in rows]
        if self._prefix is not None:
            prompts, completions = [s.prompt_ids for s in chosen], [s.completion.token_ids for s in chosen]
            return pack_shared_prefix(prompts, completions, self.pad_id, values, rows)
        return pack([s.prompt_ids for s in chosen], [s.completion.token_ids for s in chosen], self.pad_id, values, rows)

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

    @torch.no_grad()
    def _recompute_old(self, sequences: list[TrainSequence], device: torch.device) -> None:
        def recompute(rows: list[int]) -> None:
            batch = self._pack(sequences, rows).to(device)
            temperature_B = self._temperatures_B(sequences, rows, device)
            logp_BT = token_logprobs(self._forward.logits(batch), batch.targets_BT1, temperature_B)
            for j, i in enumerate(rows):
                s = sequences[i]
                start = 0 if isinstance(batch, SharedPrefixBatch) else len(s.prompt_ids) - 1
                s.completion.logprobs = logp_BT[j, start : start + s.completion.num_tokens].float().cpu()

        def pad() -> None:  # the same forwards (collectives) as the busiest rank
            full_logits(self.model, dummy_batch(self.pad_id, device))

        buckets = self._buckets(sequences, list(range(len(sequences))))
        lockstep_passes(buckets, recompute, pad, self.reduce_max, device)

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
        if cfg.recompute_old_logprobs and not self._old_from_forward:
            sampler_logprobs = [s.completion.logprobs for s in sequences]  # before the recompute replaces them
            self._recompute_old(sequences, device)
            if cfg.tis_cap is not None and sequences:
                tis_stats = self._importance_weights(sequences, sampler_logprobs, cfg.tis_cap)
        stats = _WeightedMeans()
        order = list(range(len(sequences)))
        rng = random.Random(seed)
        for epoch in range(cfg.epochs):
            rng.shuffle(order)
            for m in range(cfg.num_minibatches):
                minibatch = order[m :: cfg.num_minibatches]
                self._minibatch(sequences, minibatch, backward, device, stats, first=epoch == 0 and m == 0)
                step()
        return stats.means() | tis_stats

    def _minibatch(
        self,
        sequences: list[TrainSequence],
        minibatch: list[int],
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
        stats: _WeightedMeans,
        first: bool,
    ) -> None:
        """The forward/backward passes of one minibatch (one optimiser step), adding their statistics to ``stats``."""
        cfg = self.config
        normaliser_R, role_counts = self._normalisers(sequences, minibatch, device)
        stats.add("normaliser_share/search", role_counts["search_share"])
        # With per-role gradient norms, every search pass runs before every aggregation pass.
        groups = [[i for i in minibatch if sequences[i].role == r] for r in (0, 1)]
        search_grads = None
        for group, rows_g in enumerate(groups if cfg.role_grad_norms else [minibatch]):
            for micro_batch in self._passes(sequences, rows_g, normaliser_R, backward, device):
                for name, (value, n) in micro_batch.items():
                    stats.add(name, value, n)
                    if first and name == "ratio_dev":
                        stats.add("ratio_dev_first_minibatch", value, n)
            if cfg.role_grad_norms and group == 0 and role_counts["aggregation_sequences"] > 0:
                search_grads = grad_copy(self.model)
        if cfg.role_grad_norms:
            norms = role_grad_norms(self.model, search_grads, cfg.max_grad_norm, self.reduce_sum, self.sharded, device)
            for name, value in norms.items():
                stats.add(name, value)

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
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> list[Stats]:
        """Forward/backward over ``rows`` in micro-batches, then zero-weight passes up to the busiest rank's count
        (module docstring); the statistics of each real micro-batch."""

        def run(bucket: list[int]) -> Stats:
            return self._micro_batch(sequences, [rows[i] for i in bucket], normaliser_R, backward, device)

        def pad() -> None:
            self._zero_weight_micro_batch(backward, device)

        return lockstep_passes(self._buckets(sequences, rows), run, pad, self.reduce_max, device)

    def _normalisers(
        self, sequences: list[TrainSequence], minibatch: list[int], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each role's loss denominator ``[2]`` over one minibatch, summed over ranks (module docstring), and the
        minibatch's counts: the search tokens' share of all tokens, and the aggregation sequences over ranks."""
        roles = [sequences[i].role for i in minibatch]
        tokens = [sequences[i].completion.num_tokens for i in minibatch]
        tokens_R, sequences_R = rank_summed_counts(roles, tokens, self.reduce_sum, device)
        cfg = self.config
        normaliser_R = role_normalisers(tokens_R, sequences_R, cfg.reduction, cfg.norm_const, cfg.role_normalisation)
        share = float(tokens_R[0] / tokens_R.sum()) if float(tokens_R.sum()) > 0 else 0.0
        return normaliser_R.to(device), {"search_share": share, "aggregation_sequences": float(sequences_R[1])}

    def _zero_weight_micro_batch(self, backward: Callable[[torch.Tensor], None], device: torch.device) -> None:
        """The forwards (policy, and reference with KL on) and backward of a micro-batch, with zero gradient."""
        batch = dummy_batch(self.pad_id, device)
        if self.config.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                full_logits(self.reference, batch)
        zero_weight_pass(self.model, batch, backward)

    def _micro_batch(
        self,
        sequences: list[TrainSequence],
        rows: list[int],
        normaliser_R: torch.Tensor,
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> Stats:
        cfg = self.config
        batch = self._pack(sequences, rows).to(device)
        logits_BTV = self._forward.logits(batch)
        temperature_B = self._temperatures_B(sequences, rows, device)
        logp_BT = token_logprobs(logits_BTV, batch.targets_BT1, temperature_B)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy_BT = token_entropy(logits_BTV, temperature_B)
        ref_BT = None
        if cfg.kl_coef > 0 and self._reference_forward is not None:
            with torch.no_grad():
                ref_BT = token_logprobs(self._reference_forward.logits(batch), batch.targets_BT1, temperature_B)
        roles_B = torch.tensor([sequences[i].role for i in rows], device=device)
        adv_B = torch.tensor([sequences[i].advantage for i in rows], device=device, dtype=torch.float32)
        normaliser, weights_B = self._loss_weights(normaliser_R, roles_B)
        mask_BT = batch.completion_mask_BT1
        old_BT, tis_BT, tis_stats = self._old_and_weights(batch, logp_BT)
        loss, stats = policy_loss(
            logp_BT,
            old_BT,
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
            token_weights_BT=tis_BT,
        )
        # DDP and FSDP (1 and 2) average gradients over ranks; the normaliser already sums over ranks, so undo
        # the average (tests/training/test_distributed.py checks both against one process).
        backward(loss * self.world_size)
        n = float(mask_BT.sum())
        out = {k: (float(v), n) for k, v in stats.items() if k != "n_tokens"}
        out["loss"] = (float(loss.detach()) * float(normaliser) / max(n, 1.0), n)
        out |= {k: (float(v), n) for k, v in tis_stats.items()}
        return out | self._role_stats(batch, logp_BT, old_BT, tis_BT, adv_B, roles_B, entropy_BT)

    def _old_and_weights(
        self, batch: PackedBatch | SharedPrefixBatch, logp_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The old log-probs of a micro-batch, its truncated importance weights (None: off) and their statistics.
        With one optimiser step per update and the trainer's own old log-probs (``_old_from_forward``), the old
        policy is this forward itself, detached (ratio 1), and the weights compare it with the sampler's."""
        if not self._old_from_forward:
            return batch.values_BT1["old"], batch.values_BT1.get("tis"), {}
        old_BT = logp_BT.detach()
        if self.config.tis_cap is None:
            return old_BT, None, {}
        tis_BT, stats = truncated_importance_weights(
            old_BT, batch.values_BT1["old"], batch.completion_mask_BT1, self.config.tis_cap
        )
        return old_BT, tis_BT, stats

    def _loss_weights(self, normaliser_R: torch.Tensor, roles_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch loss's normaliser and ``[B]`` sequence weights: the role weights over the shared
        denominator, or each role's weight over its own denominator (``role_normalisation: per_role``)."""
        weights_R = torch.tensor((self.config.search_weight, self.config.aggregation_weight), device=roles_B.device)
        if self.config.role_normalisation == "shared":
            return normaliser_R[0], weights_R[roles_B]
        return torch.ones((), device=roles_B.device), (weights_R / normaliser_R)[roles_B]

    @torch.no_grad()
    def _role_stats(
        self,
        batch: PackedBatch | SharedPrefixBatch,
        logp_BT: torch.Tensor,
        old_BT: torch.Tensor,
        tis_BT: torch.Tensor | None,
        adv_B: torch.Tensor,
        roles_B: torch.Tensor,
        entropy_BT: torch.Tensor,
    ) -> Stats:
        """Each role's policy-gradient loss and entropy over its kept tokens in this micro-batch."""
        cfg, mask_BT, out = self.config, batch.completion_mask_BT1, {}
        for role, name in enumerate(ROLES):
            role_mask = mask_BT & (roles_B == role)[:, None]
            n_role = float(role_mask.sum())
            if n_role:
                _, role_stats = policy_loss(
                    logp_BT.detach(), old_BT, adv_B, role_mask, 1.0,
                    loss_type=cfg.loss_type, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    token_weights_BT=tis_BT,
                )  # fmt: skip
                out[f"loss/{name}"] = (float(role_stats["pg_loss"]), n_role)
                out[f"entropy/{name}"] = (float((entropy_BT.detach() * role_mask).sum()) / n_role, n_role)
        return out
