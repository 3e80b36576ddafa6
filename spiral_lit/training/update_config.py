"""The configuration of phase 6 (``model.init_args.update``): the surrogate loss, its reduction and role
weights, and how a rollout batch is cut into optimiser steps and micro-batches (:mod:`spiral_lit.training.update`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from spiral_lit.algorithms import LossType, Reduction
from spiral_lit.algorithms.roles import RoleNormalisation
from spiral_lit.errors import UserError


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
    recompute_old_logprobs: bool | None = None
    """Use the trainer's own no-grad log-probs as the old policy instead of the sampler's.
    Needed when sampling and training differ numerically (bf16 autocast, another engine). None: on exactly when
    the Trainer's ``precision`` is a 16-bit one, where sampler and trainer round differently
    (:func:`resolve_for_precision`); set it for another engine (vLLM)."""
    tis_cap: float | None = None
    """Truncated importance sampling (docs/algorithm.md §4.3): weight each token's policy-gradient term by
    min(exp(trainer_old - sampler), tis_cap), correcting for a sampler that is not the trainer (a bf16 or stale
    vLLM engine); logs ``train/tis_mean``, ``tis_max``, ``tis_clip_frac`` and ``logprob_abs_diff``. Needs
    ``recompute_old_logprobs``; when that is left to the precision and turns on, None means
    :data:`MIXED_PRECISION_TIS_CAP`."""
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
    this many in a row stop the run (docs/algorithm.md §8.4)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "num_minibatches", "micro_batch_size", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"update.{key} must be >= 1, got {getattr(self, key)}")
        if self.reduction == "seq_mean_token_sum_norm" and not self.norm_const:
            raise UserError("update.norm_const must be set (> 0) when update.reduction is 'seq_mean_token_sum_norm'")
        if self.tis_cap is not None and (self.tis_cap <= 0 or self.recompute_old_logprobs is False):
            raise UserError(
                f"update.tis_cap={self.tis_cap}: needs a value > 0 and update.recompute_old_logprobs: true (the "
                "weight compares the trainer's recomputed log-probs with the sampler's)"
            )


MIXED_PRECISION_TIS_CAP = 2.0
"""The truncated importance cap under 16-bit precision when ``update.tis_cap`` is not set (the value of Yao et al.
2025's recipe that docs/algorithm.md §4.3 follows)."""


def resolve_for_precision(config: UpdateConfig, precision: str) -> UpdateConfig:
    """``config`` with ``recompute_old_logprobs: None`` decided by the Trainer's ``precision`` (docs/algorithm.md
    §4.3): under ``bf16-mixed``, ``bf16-true``, ``16-mixed`` or ``16-true`` the sampler's log-probs round
    differently from the trainer's, so the trainer's own are the old policy and truncated importance weights
    (cap :data:`MIXED_PRECISION_TIS_CAP` unless set) correct for the sampler; in fp32 both are the same numbers
    and the sampler's are used, saving a forward pass."""
    if config.recompute_old_logprobs is not None:
        return config
    if not str(precision).startswith(("bf16", "16")):
        return replace(config, recompute_old_logprobs=False)
    cap = config.tis_cap if config.tis_cap is not None else MIXED_PRECISION_TIS_CAP
    return replace(config, recompute_old_logprobs=True, tis_cap=cap)
