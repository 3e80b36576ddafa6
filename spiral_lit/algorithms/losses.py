"""Policy-gradient surrogate losses and token log-probabilities (docs/algorithm.md §4).

One loss covers search and aggregation sequences alike: each sequence carries one scalar
advantage (§3) broadcast to its tokens. The loss type is a ``Literal`` dispatched in
exactly one place (:func:`_surrogate_BT`).

Micro-batch invariance: :func:`policy_loss` divides the *sum* over kept tokens by a
normaliser the caller computes once over the whole minibatch (all micro-batches, all ranks)
with :func:`loss_normaliser` (per role: :func:`spiral_lit.algorithms.roles.role_normalisers`). Summing the
micro-batch losses then gives the loss and gradient of one pass over the whole minibatch, whatever the split.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["ppo_clip", "reinforce_is"]
"""``ppo_clip``: token-level clipped ratio (asymmetric "clip-higher"); ``reinforce_is``: ratio * A, no clip."""
Reduction = Literal["token_mean", "seq_mean_token_sum_norm"]
"""``token_mean``: divide by the kept-token count; ``seq_mean_token_sum_norm``: by n_seq * const (Dr.GRPO)."""


def loss_denominators(
    tokens: torch.Tensor, sequences: torch.Tensor, reduction: Reduction, norm_const: float | None
) -> torch.Tensor:
    """The loss denominator of each group of tokens, elementwise over ``tokens`` / ``sequences`` (any shape, the
    kept tokens and the sequences of each group), before the floor at 1 (docs/algorithm.md §4.5).

    ``token_mean``: the number of kept tokens. ``seq_mean_token_sum_norm``: the number of sequences *
    ``norm_const`` (e.g. the max response length), a constant that does not depend on how long the sampled
    sequences are. The one implementation of the reductions: :func:`loss_normaliser` and
    :func:`spiral_lit.algorithms.roles.role_normalisers` (what the update uses) both call it.
    """
    if reduction == "token_mean":
        return tokens.float()
    if reduction == "seq_mean_token_sum_norm":
        if norm_const is None or norm_const <= 0:
            raise ValueError(f"reduction='seq_mean_token_sum_norm' needs norm_const > 0; got norm_const={norm_const}")
        return sequences.float() * float(norm_const)
    raise ValueError(f"reduction={reduction!r}; allowed: 'token_mean', 'seq_mean_token_sum_norm'")


def loss_normaliser(mask_BT: torch.Tensor, reduction: Reduction, norm_const: float | None = None) -> torch.Tensor:
    """The scalar the summed token loss of the rows of ``mask_BT`` ``[B, T]`` is divided by: :func:`loss_denominators`
    of its kept tokens and its B sequences, at least 1 (so an empty batch gives loss 0, not NaN).

    Compute it over the whole minibatch, not per micro-batch (module docstring).
    """
    sequences = torch.tensor(float(mask_BT.shape[0]), device=mask_BT.device)
    return loss_denominators(mask_BT.sum(), sequences, reduction, norm_const).clamp(min=1.0)


def _surrogate_BT(
    ratio_BT: torch.Tensor, adv_BT: torch.Tensor, loss_type: LossType, clip_low: float, clip_high: float
) -> torch.Tensor:
    """Per-token policy-gradient loss for ``loss_type``: the one place the loss type is dispatched."""
    if loss_type == "ppo_clip":
        clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
        return -torch.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
    if loss_type == "reinforce_is":
        # d/dlogp (-r A) = -r A: importance-weighted REINFORCE toward the sampler's tokens.
        return -ratio_BT * adv_BT
    raise ValueError(f"loss_type={loss_type!r}; allowed: 'ppo_clip', 'reinforce_is'")


def _k3(log_ratio_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || q) from log(q/pi) per token: exp(x) - x - 1 >= 0 (Schulman)."""
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1.0


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    normaliser: torch.Tensor | float,
    *,
    loss_type: LossType = "ppo_clip",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    seq_weights_B: torch.Tensor | None = None,
    ref_logprobs_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_BT: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    token_weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Surrogate loss of one micro-batch (docs/algorithm.md §4.2); returns ``(loss, stats)``.

    Per kept token: pg = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) for ``ppo_clip``, or
    -r A for ``reinforce_is``, with r = exp(logp - logp_old); plus ``kl_coef`` * k3(ref || pi)
    and minus ``entropy_coef`` * entropy. ``seq_weights_B`` (e.g. a role weight) multiplies
    the whole per-token loss of its sequence. ``token_weights_BT`` (no gradient; e.g. the truncated
    importance weights of :func:`truncated_importance_weights`) multiplies the policy-gradient term
    of each token. loss = sum over kept tokens / ``normaliser``.

    ``stats`` are detached means over this micro-batch's kept tokens, plus ``n_tokens`` so the
    caller can aggregate exactly (sum = mean * n_tokens): ``pg_loss``, ``clip_frac_low``
    (r < 1 - clip_low and A < 0), ``clip_frac_high`` (r > 1 + clip_high and A > 0),
    ``ratio_dev`` (|r - 1|), ``approx_kl`` (k3 between old and new), and ``kl_ref`` /
    ``entropy`` when given. For ``reinforce_is`` the clip fractions report where PPO *would*
    clip (nothing is clipped): a measure of how off-policy the batch is.
    """
    mask_BT = mask_BT.bool()
    # Zero the log-ratio at dropped tokens before exp, so padding (e.g. -inf logprobs) can
    # never put inf/NaN into the loss or its gradient.
    log_ratio_BT = torch.where(mask_BT, logprobs_BT - old_logprobs_BT, torch.zeros_like(logprobs_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = advantages_B.to(logprobs_BT.dtype).unsqueeze(-1).expand_as(logprobs_BT)
    pg_BT = _surrogate_BT(ratio_BT, adv_BT, loss_type, clip_low, clip_high)
    if token_weights_BT is not None:
        pg_BT = pg_BT * token_weights_BT.detach().to(pg_BT.dtype)

    loss_BT = pg_BT
    kl_ref_BT = None
    if ref_logprobs_BT is not None:
        ref_log_ratio_BT = torch.where(mask_BT, ref_logprobs_BT - logprobs_BT, torch.zeros_like(logprobs_BT))
        kl_ref_BT = _k3(ref_log_ratio_BT)
        loss_BT = loss_BT + kl_coef * kl_ref_BT
    if entropy_BT is not None:
        loss_BT = loss_BT - entropy_coef * torch.where(mask_BT, entropy_BT, torch.zeros_like(entropy_BT))
    if seq_weights_B is not None:
        loss_BT = loss_BT * seq_weights_B.to(loss_BT.dtype).unsqueeze(-1)
    loss = torch.where(mask_BT, loss_BT, torch.zeros_like(loss_BT)).sum() / normaliser

    with torch.no_grad():
        keep_BT = mask_BT.to(torch.float32)  # stats in float32 even for bf16 logprobs
        n_tokens = keep_BT.sum()
        denom = n_tokens.clamp(min=1.0)

        def kept_mean(values_BT: torch.Tensor) -> torch.Tensor:
            return (values_BT.detach().to(keep_BT.dtype) * keep_BT).sum() / denom

        stats = {
            "pg_loss": kept_mean(pg_BT),
            "clip_frac_low": kept_mean(((ratio_BT < 1.0 - clip_low) & (adv_BT < 0)).to(keep_BT.dtype)),
            "clip_frac_high": kept_mean(((ratio_BT > 1.0 + clip_high) & (adv_BT > 0)).to(keep_BT.dtype)),
            "ratio_dev": kept_mean((ratio_BT - 1.0).abs()),
            # k3 of KL(new || old) from log(old/new) = -log_ratio.
            "approx_kl": kept_mean(_k3(-log_ratio_BT)),
            "n_tokens": n_tokens,
        }
        if kl_ref_BT is not None:
            stats["kl_ref"] = kept_mean(kl_ref_BT)
        if entropy_BT is not None:
            stats["entropy"] = kept_mean(entropy_BT)
    return loss, stats


def truncated_importance_weights(
    trainer_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (TIS) weights of trainer against sampler, per token (docs/algorithm.md §4.3).

    When the rollout engine's log-probabilities differ from the trainer's (a bf16 engine, other kernels,
    weights a few updates stale), the tokens were drawn from pi_sampler, not from the pi_old the PPO ratio
    divides by. Each token's policy-gradient term is therefore weighted by
    w = min(exp(logp_trainer_old - logp_sampler), cap) (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"); the cap bounds the variance a rare token can add.

    ``trainer_logprobs_BT`` / ``sampler_logprobs_BT``: ``[B, T]`` log-probs of the sampled tokens; ``mask_BT``:
    ``[B, T]`` True = keep. Returns ``(weights_BT, stats)``: weights are 1 at dropped tokens and carry no gradient;
    ``stats`` over kept tokens: ``tis_mean``, ``tis_max`` (of the truncated weight), ``tis_clip_frac``
    (fraction whose raw weight exceeded the cap) and ``logprob_abs_diff`` (mean |trainer - sampler|: how far the
    two disagree, e.g. under bf16).
    """
    if cap <= 0:
        raise ValueError(f"update.tis_cap must be > 0, got {cap}")
    mask_BT = mask_BT.bool()
    with torch.no_grad():
        log_w_BT = torch.where(mask_BT, trainer_logprobs_BT.float() - sampler_logprobs_BT.float(), 0.0)
        raw_BT = torch.exp(log_w_BT)
        weights_BT = torch.where(mask_BT, raw_BT.clamp(max=cap), 1.0)
        keep_BT = mask_BT.float()
        n = keep_BT.sum().clamp(min=1.0)
        stats = {
            "tis_mean": (weights_BT * keep_BT).sum() / n,
            "tis_max": weights_BT.masked_fill(~mask_BT, 0.0).max() if bool(mask_BT.any()) else weights_BT.new_ones(()),
            "tis_clip_frac": ((raw_BT > cap) & mask_BT).float().sum() / n,
            "logprob_abs_diff": (log_w_BT.abs() * keep_BT).sum() / n,
        }
    return weights_BT, stats


LOGITS_CHUNK_BYTES = 64 << 20
"""float32 logits per chunk of rows in :func:`token_logprobs` / :func:`token_entropy` (at least one row)."""


def _chunk_rows(logits_BTV: torch.Tensor) -> int:
    """Rows per chunk: at most :data:`LOGITS_CHUNK_BYTES` of float32 logits, at least one row."""
    _, T, V = logits_BTV.shape
    return max(1, LOGITS_CHUNK_BYTES // max(1, T * V * 4))


def _temperature_chunks(temperature: float | torch.Tensor, rows: int, n_rows: int) -> list[float | torch.Tensor]:
    """The temperature of each chunk of ``rows`` rows: the float, or the chunk's ``[b, 1, 1]`` slice of a ``[B]``."""
    if isinstance(temperature, torch.Tensor):
        return [t_b[:, None, None] for t_b in temperature.float().split(rows)]
    return [temperature] * -(-n_rows // rows)


def token_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``targets``: ``[B, T]`` float32.

    Temperature must match the sampler's, or the importance ratio is off from the start: one for all rows,
    or a ``[B]`` tensor when rows were sampled at different temperatures (search and aggregation traces).
    Memory-lean: a chunk of rows at a time (:data:`LOGITS_CHUNK_BYTES` of float32; one row of a 150k vocabulary
    and 1k tokens is already more), so the forward pass holds at most a couple of chunk-sized temporaries instead
    of ``[B, T, V]`` copies; only the logsumexp input of each chunk is kept for backward (as TRL's
    selective_log_softmax does). Small vocabularies take few chunks instead of one call per row
    (docs/algorithm.md §8.2).
    """
    if logits_BTV.shape[0] == 0:
        return logits_BTV.new_zeros(targets_BT.shape, dtype=torch.float32)
    chunks = []
    rows = _chunk_rows(logits_BTV)
    temperatures = _temperature_chunks(temperature, rows, logits_BTV.shape[0])
    for logits_bTV, targets_bT, t in zip(logits_BTV.split(rows), targets_BT.split(rows), temperatures, strict=True):
        scaled_bTV = logits_bTV.float() / t
        target_logit_bT = scaled_bTV.gather(-1, targets_bT.long().unsqueeze(-1)).squeeze(-1)
        chunks.append(target_logit_bT - torch.logsumexp(scaled_bTV, dim=-1))
    return torch.cat(chunks)


def token_entropy(logits_BTV: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: ``[B, T]`` float32, a chunk of rows at a time.

    ``temperature``: one for all rows, or a ``[B]`` tensor (as in :func:`token_logprobs`)."""
    if logits_BTV.shape[0] == 0:
        return logits_BTV.new_zeros(logits_BTV.shape[:2], dtype=torch.float32)
    chunks = []
    rows = _chunk_rows(logits_BTV)
    temperatures = _temperature_chunks(temperature, rows, logits_BTV.shape[0])
    for logits_bTV, t in zip(logits_BTV.split(rows), temperatures, strict=True):
        logp_bTV = torch.log_softmax(logits_bTV.float() / t, dim=-1)
        # A banned token (logit -inf) has p log p = 0 * -inf = NaN; its limit, and its share of the entropy, is 0.
        p_logp_bTV = torch.where(logp_bTV > float("-inf"), logp_bTV.exp() * logp_bTV, 0.0)
        chunks.append(-p_logp_bTV.sum(dim=-1))
    return torch.cat(chunks)
