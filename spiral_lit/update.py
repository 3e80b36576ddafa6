"""Phase 6 of a step: recompute log-probabilities and update the policy over micro-batches.

Search and aggregation sequences go through one loss (method.md section 4), each with its
scalar advantage and a per-role weight. The normaliser of the loss is computed over the
whole minibatch and summed over ranks before any backward pass, so neither the
micro-batch split nor the number of ranks changes the gradient. The optimiser itself is
stepped by the caller (the LightningModule owns it), through the ``backward`` and
``step`` callables.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from spiral_lit.algorithms import LossType, Reduction, policy_loss, token_entropy, token_logprobs
from spiral_lit.batching import PackedBatch, length_buckets, pack
from spiral_lit.rollout.base import Completion

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
    """Most padded tokens per forward/backward (length bucketing); None = no limit."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the frozen reference policy (paper: 0)."""
    entropy_coef: float = 0.0
    """Entropy bonus (paper: 0)."""
    max_grad_norm: float = 1.0
    recompute_old_logprobs: bool = False
    """Use the trainer's own no-grad log-probs as the old policy instead of the sampler's.
    Needed when sampling and training differ numerically (bf16 autocast, another engine)."""
    search_weight: float = 1.0
    aggregation_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("epochs", "num_minibatches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"update.{key} must be >= 1, got {getattr(self, key)}")
        if self.reduction == "seq_mean_token_sum_norm" and not self.norm_const:
            raise ValueError("update.norm_const must be set (> 0) when update.reduction is 'seq_mean_token_sum_norm'")


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
        temperature: float,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        reduce_max: Callable[[torch.Tensor], torch.Tensor],
        world_size: int,
        reference: PreTrainedModel | None = None,
    ) -> None:
        self.model, self.config, self.pad_id, self.temperature = model, config, pad_id, temperature
        self.reduce_sum, self.reduce_max = reduce_sum, reduce_max
        self.world_size, self.reference = world_size, reference

    def _pack(self, sequences: list[TrainSequence], rows: list[int]) -> PackedBatch:
        chosen = [sequences[i] for i in rows]
        return pack(
            [s.prompt_ids for s in chosen],
            [s.completion.token_ids for s in chosen],
            self.pad_id,
            {"old": [s.completion.logprobs for s in chosen]},
            rows,
        )

    def _logits(self, model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
        return model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]

    @torch.no_grad()
    def _recompute_old(self, sequences: list[TrainSequence], device: torch.device) -> None:
        lengths = [len(s.prompt_ids) + s.completion.num_tokens for s in sequences]
        for rows in length_buckets(lengths, self.config.micro_batch_size, self.config.micro_batch_tokens):
            batch = self._pack(sequences, rows).to(device)
            logp_BT = token_logprobs(self._logits(self.model, batch), batch.targets_BT1, self.temperature)
            for j, i in enumerate(rows):
                s = sequences[i]
                start = len(s.prompt_ids) - 1
                s.completion.logprobs = logp_BT[j, start : start + s.completion.num_tokens].float().cpu()

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
        if cfg.recompute_old_logprobs:
            self._recompute_old(sequences, device)
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
                lengths = [len(sequences[i].prompt_ids) + sequences[i].completion.num_tokens for i in minibatch]
                normaliser = self._normaliser(sequences, minibatch, device)
                buckets = length_buckets(lengths, cfg.micro_batch_size, cfg.micro_batch_tokens)
                # Every rank runs as many backward passes as the busiest one (each is a DDP all-reduce).
                n_passes = int(self.reduce_max(torch.tensor(float(len(buckets)), device=device)))
                for bucket in buckets:
                    rows = [minibatch[i] for i in bucket]
                    stats = self._micro_batch(sequences, rows, normaliser, weights, backward, device)
                    for name, (value, n) in stats.items():
                        add(name, value, n)
                        if first and name == "ratio_dev":
                            add("ratio_dev_first_minibatch", value, n)
                for _ in range(n_passes - len(buckets)):
                    backward(sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0)
                step()
                first = False
        return {k: totals[k] / max(counts[k], 1e-12) for k in totals}

    def _normaliser(self, sequences: list[TrainSequence], minibatch: list[int], device: torch.device) -> torch.Tensor:
        """The loss denominator of one minibatch, summed over ranks (see the module docstring)."""
        if self.config.reduction == "token_mean":
            n_tokens = float(sum(sequences[i].completion.num_tokens for i in minibatch))
            return self.reduce_sum(torch.tensor(n_tokens, device=device)).clamp(min=1.0)
        n_seq = self.reduce_sum(torch.tensor(float(len(minibatch)), device=device))
        return n_seq * float(self.config.norm_const or 1.0)

    def _micro_batch(
        self,
        sequences: list[TrainSequence],
        rows: list[int],
        normaliser: torch.Tensor,
        weights: tuple[float, float],
        backward: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> dict[str, tuple[float, float]]:
        cfg = self.config
        batch = self._pack(sequences, rows).to(device)
        logits_BTV = self._logits(self.model, batch)
        logp_BT = token_logprobs(logits_BTV, batch.targets_BT1, self.temperature)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy_BT = token_entropy(logits_BTV, self.temperature)
        ref_BT = None
        if cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                ref_BT = token_logprobs(self._logits(self.reference, batch), batch.targets_BT1, self.temperature)
        roles_B = torch.tensor([sequences[i].role for i in rows], device=device)
        adv_B = torch.tensor([sequences[i].advantage for i in rows], device=device, dtype=torch.float32)
        weights_B = torch.tensor(weights, device=device)[roles_B]
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
        )
        # DDP averages gradients over ranks; the normaliser already sums over ranks, so undo the average.
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
                    )  # fmt: skip
                    out[f"loss/{name}"] = (float(role_stats["pg_loss"]), n_role)
                    out[f"entropy/{name}"] = (float((entropy_BT.detach() * role_mask).sum()) / n_role, n_role)
        return out
