"""Per-sequence advantages for SPIRAL and the GRPO baseline (docs/algorithm.md §3 and §5).

Every advantage is a scalar per sequence; the loss broadcasts it to the sequence's tokens.

Standard-deviation convention for ``scale_by_std`` (an option of ours; the paper divides by
nothing, Dr.GRPO style): the *sample* standard deviation (Bessel-corrected, ``correction=1``),
the same as ``torch.std``'s default used by TRL's GRPOTrainer, so scaled numbers compare with
that reference. A group of one member has std 0 by definition here (its centred value is 0, so
its advantage stays 0 rather than NaN). ``_STD_EPS`` is added to the std before dividing so
that equal rewards give 0, never NaN.
"""

from __future__ import annotations

import torch

_STD_EPS = 1e-6


def _centre(values: torch.Tensor, scale_by_std: bool) -> torch.Tensor:
    """``values`` minus the mean over the last dim, optionally / (sample std + eps)."""
    centred = values - values.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    correction = 1 if values.shape[-1] > 1 else 0
    std = values.std(dim=-1, keepdim=True, correction=correction)
    return centred / (std + _STD_EPS)


def spiral_advantages(
    rewards: torch.Tensor, sets: torch.Tensor, n_search: int, scale_by_std: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPIRAL advantages of the search and aggregation traces (docs/algorithm.md §3.1, §3.2).

    Args:
        rewards: ``[B, K, A]`` reward of aggregation sample j of set i, R[i, j].
        sets: ``[B, K, S]`` (long) search-trace indices in ``[0, n_search)`` forming set i.
        n_search: number of search traces per prompt.
        scale_by_std: divide set advantages by the std of the K set scores, and aggregation
            advantages by the std of the A siblings (before search traces average them).

    Returns:
        ``(search_adv_BN, agg_adv_BKA)``: ``[B, n_search]`` search advantage = mean of the set
        advantages f_i - mean_i' f_i' over the sets containing the trace (0 when in none), and
        ``[B, K, A]`` aggregation advantage R[i, j] - mean_j' R[i, j'].
    """
    _check_round(rewards, sets, n_search, "", f"search indices in [0, n_search={n_search})")
    if not rewards.is_floating_point():
        rewards = rewards.float()  # verifier scores may arrive as 0/1 integers
    return set_credit(rewards, sets, n_search, scale_by_std), _centre(rewards, scale_by_std)


def _check_round(rewards: torch.Tensor, sets: torch.Tensor, n_members: int, where: str, members: str) -> None:
    """Rewards ``[B, K, A]`` and sets ``[B, K, S]`` of one round agree, and the sets index its ``n_members``."""
    if rewards.dim() != 3 or sets.dim() != 3 or rewards.shape[:2] != sets.shape[:2]:
        raise ValueError(
            f"{where}rewards must be [B, K, A] and sets [B, K, S] with matching B, K; "
            f"got rewards {tuple(rewards.shape)} and sets {tuple(sets.shape)}"
        )
    if sets.numel() and (int(sets.min()) < 0 or int(sets.max()) >= n_members):
        raise ValueError(f"{where}sets must hold {members}")


def set_credit(rewards: torch.Tensor, sets: torch.Tensor, n_members: int, scale_by_std: bool = False) -> torch.Tensor:
    """``[B, n_members]``: each member's mean set advantage over the sets that contain it (0 when in none).

    A set's score f_i is the mean reward of its aggregations ``rewards[b, i]``; its advantage is f_i minus the
    mean set score of the prompt (docs/algorithm.md §3.1). ``sets`` ``[B, K, S]`` index the ``n_members`` traces
    the sets were drawn from (search traces, or the previous round's aggregations in §10).
    """
    batch, n_sets, set_size = sets.shape
    set_score_BK = rewards.mean(dim=-1)  # f_i
    set_adv_BK = _centre(set_score_BK, scale_by_std)  # A#_i
    # Each set advantage is credited to each of its S members; average per member by scatter.
    index_BM = sets.reshape(batch, n_sets * set_size).long()  # M = K * S memberships
    credit_BM = set_adv_BK.unsqueeze(-1).expand(batch, n_sets, set_size).reshape(batch, -1)
    adv_sum_BN = rewards.new_zeros(batch, n_members).scatter_add_(1, index_BM, credit_BM)
    count_BN = rewards.new_zeros(batch, n_members).scatter_add_(1, index_BM, torch.ones_like(credit_BM))
    return adv_sum_BN / count_BN.clamp(min=1.0)  # a member of no set: 0 / 1 = 0


def recursive_advantages(
    rewards: list[torch.Tensor],
    sets: list[torch.Tensor],
    n_search: int,
    next_round_weight: float = 1.0,
    scale_by_std: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Advantages of ``T = len(rewards)`` trained rounds of aggregation (docs/algorithm.md §10.2).

    Args:
        rewards: per round r = 1..T, ``[B, K, A]`` rewards of its aggregation traces.
        sets: per round, ``[B, K, S]`` sets of that round: round 1's index the ``n_search`` search traces, round
            r >= 2's the ``K * A`` traces of round r - 1, flattened set-major (trace ``k * A + a``).
        n_search: search traces per prompt.
        next_round_weight: weight of the next round's set credit in an intermediate round's advantage.
        scale_by_std: as in :func:`spiral_advantages`.

    Returns:
        ``(search_adv_BN, [agg_adv_BKA per round])``: search traces get their mean set advantage over round 1's
        sets; round T's traces their reward minus their siblings' mean; an intermediate round's traces that
        sibling-centred advantage plus ``next_round_weight`` times their mean set advantage over round r + 1's
        sets. With ``T = 1`` this is :func:`spiral_advantages` exactly.
    """
    if not rewards or len(rewards) != len(sets):
        raise ValueError(
            f"need one [B, K, A] rewards and one [B, K, S] sets per round; got {len(rewards)} and {len(sets)}"
        )
    search_adv_BN, first_BKA = spiral_advantages(rewards[0], sets[0], n_search, scale_by_std)
    agg_adv = [first_BKA] + [_centre(r.float(), scale_by_std) for r in rewards[1:]]
    for r in range(len(rewards) - 1):  # round r + 1's sets credit round r's traces (0-based rounds)
        batch, n_sets, n_agg = rewards[r].shape
        later_rewards, later_sets = rewards[r + 1], sets[r + 1]
        _check_round(later_rewards, later_sets, n_sets * n_agg, f"round {r + 2}: ", f"indices of round {r + 1}'s "
                     f"{n_sets * n_agg} traces")  # fmt: skip
        credit_BM = set_credit(later_rewards.float(), later_sets, n_sets * n_agg, scale_by_std)
        agg_adv[r] = agg_adv[r] + next_round_weight * credit_BM.view(batch, n_sets, n_agg)
    return search_adv_BN, agg_adv


def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = False) -> torch.Tensor:
    """GRPO baseline advantages (docs/algorithm.md §5): ``[B, G]`` reward minus group mean.

    With ``scale_by_std``, divided by (sample std of the group + 1e-6), as in the module docstring.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G]; got {tuple(rewards.shape)}")
    return _centre(rewards, scale_by_std)


def length_gate(advantages: torch.Tensor, lengths: torch.Tensor, length_target: int) -> torch.Tensor:
    """Zero the *positive* advantages of sequences longer than ``length_target`` (paper Eq. 8, docs/algorithm.md §3.5).

    Negative and zero advantages are kept, so overlong wrong answers are still pushed down
    while overlong right ones are not rewarded. ``lengths`` has the shape of ``advantages``.
    """
    if lengths.shape != advantages.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} must match advantages {tuple(advantages.shape)}")
    overlong_positive = (advantages > 0) & (lengths > length_target)
    return torch.where(overlong_positive, torch.zeros_like(advantages), advantages)


def informative_groups(rewards_BG: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: True (keep) where the group's rewards are not all equal (dynamic sampling, docs/algorithm.md §3.6).

    A group of equal rewards has all-zero advantages and carries no gradient signal.
    """
    flat_BM = rewards_BG.reshape(rewards_BG.shape[0], -1)
    return (flat_BM != flat_BM[:, :1]).any(dim=-1)


def informative_prompts(rewards_BKA: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: True (keep) where not every aggregation reward of the prompt is equal (docs/algorithm.md §3.6).

    Then all set and aggregation advantages are zero, and so are the search advantages.
    """
    if rewards_BKA.dim() != 3:
        raise ValueError(f"rewards must be [B, K, A]; got {tuple(rewards_BKA.shape)}")
    return informative_groups(rewards_BKA)


def informative_rounds(rewards: list[torch.Tensor]) -> torch.Tensor:
    """Bool ``[B]``: True where some round's ``[B, K, A]`` aggregation rewards are not all equal.

    Where every round's rewards are equal within the prompt, every advantage of :func:`recursive_advantages` is 0
    (docs/algorithm.md §10.2); with one round this is :func:`informative_prompts`.
    """
    keep_B = informative_prompts(rewards[0])
    for later in rewards[1:]:
        keep_B = keep_B | informative_prompts(later)
    return keep_B
