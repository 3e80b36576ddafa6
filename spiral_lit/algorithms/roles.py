"""How the two roles (search, aggregation) share one update: loss normalisers and gradient norms per role.

Both roles train one policy through one loss (docs/algorithm.md §4.5, §4.6). With the paper's
shared token mean, a role's weight in the gradient is its share of the minibatch's tokens: with 8 search
and 16 aggregation traces per prompt, aggregation prompts carrying four candidates, search tokens are
about a third of the denominator, and the search role's credit (set RL) is already weaker than GRPO's.
``per_role`` normalisation [ours] gives each role its own token mean, then sums them with the role
weights, so a role's pull does not depend on how many tokens the other produced. Which one trains
better is an empirical question; the per-role gradient norms make it visible in a run.
"""

from __future__ import annotations

from typing import Literal

import torch

from spiral_lit.algorithms.losses import Reduction, loss_denominators

RoleNormalisation = Literal["shared", "per_role"]


def role_normalisers(
    tokens_R: torch.Tensor,
    sequences_R: torch.Tensor,
    reduction: Reduction,
    norm_const: float | None,
    mode: RoleNormalisation,
) -> torch.Tensor:
    """The loss denominator of each role's tokens: ``[R]`` float32 (R = 2: search, aggregation).

    ``tokens_R`` / ``sequences_R``: kept completion tokens / sequences of each role in the minibatch (summed
    over ranks by the caller). ``shared``: every role gets the whole minibatch's denominator (the number of
    tokens for ``token_mean``, sequences x ``norm_const`` for ``seq_mean_token_sum_norm``). ``per_role``: each
    role its own. At least 1, so an empty role or minibatch gives loss 0, not NaN. The reductions are
    :func:`spiral_lit.algorithms.losses.loss_denominators`.
    """
    per_role_R = loss_denominators(tokens_R, sequences_R, reduction, norm_const)
    if mode == "shared":
        return per_role_R.sum().expand_as(per_role_R).clamp(min=1.0)
    if mode == "per_role":
        return per_role_R.clamp(min=1.0)
    raise ValueError(f"role normalisation {mode!r}; allowed: 'shared', 'per_role'")


def role_grad_sq_norms(search_grads: list[torch.Tensor], total_grads: list[torch.Tensor]) -> torch.Tensor:
    """Squared norms ``[3]`` of the search gradient, the aggregation gradient (total - search) and the total.

    ``search_grads[i]`` is parameter i's gradient after the search passes only, ``total_grads[i]`` after both
    roles' passes (same shapes). Squares, not norms, so that sharded callers can sum them over ranks first.
    """
    out = torch.zeros(3, dtype=torch.float64)
    for search, total in zip(search_grads, total_grads, strict=True):
        search64, total64 = search.double(), total.double()
        out += torch.stack([search64.square().sum(), (total64 - search64).square().sum(), total64.square().sum()])
    return out
