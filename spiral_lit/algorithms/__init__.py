"""Pure tensor maths of SPIRAL (docs/algorithm.md §2-§4): set sampling, advantages, losses.

Imports nothing else of spiral_lit and nothing of Lightning, so it can be tested and
reused on its own.
"""

from spiral_lit.algorithms.advantages import (
    grpo_advantages,
    informative_groups,
    informative_prompts,
    informative_rounds,
    length_gate,
    recursive_advantages,
    set_credit,
    spiral_advantages,
)
from spiral_lit.algorithms.losses import (
    LossType,
    Reduction,
    loss_denominators,
    loss_normaliser,
    policy_loss,
    token_entropy,
    token_logprobs,
)
from spiral_lit.algorithms.sets import sample_member_sets, sample_sets, sample_sets_batch

__all__ = [
    "LossType",
    "Reduction",
    "grpo_advantages",
    "informative_groups",
    "informative_prompts",
    "informative_rounds",
    "length_gate",
    "loss_denominators",
    "loss_normaliser",
    "policy_loss",
    "recursive_advantages",
    "sample_member_sets",
    "sample_sets",
    "sample_sets_batch",
    "set_credit",
    "spiral_advantages",
    "token_entropy",
    "token_logprobs",
]
