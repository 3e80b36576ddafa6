"""One rollout interface for training, evaluation and predict.

An engine takes prompt token ids and returns, per prompt, ``n`` sampled completions
with their token ids, the sampler's log-probabilities (of the temperature-scaled
distribution, the quantity the importance ratio needs) and why each stopped.
Engines know nothing of Lightning, tasks or SPIRAL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from spiral_lit.errors import UserError

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingConfig:
    """How one role samples: budget, temperature, nucleus, stop strings."""

    max_new_tokens: int = 128
    """Token budget of one trace (sequential compute)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    """Extra strings that end a trace (EOS always does)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One sampled trace."""

    token_ids: list[int]
    """Generated ids, including the EOS token when it stopped on one."""
    logprobs: torch.Tensor
    """[len(token_ids)] float32 sampler log-probabilities of the generated ids."""
    finish_reason: FinishReason
    text: str
    """Decoded completion without special tokens."""
    selected: str | None = None
    """The shown candidate this aggregation trace kept by reference (``prompts.aggregation_target: select``), as
    it was shown; None for every other trace. Set by the scaffolds, never by an engine."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def final_text(self) -> str:
        """What is scored and shown to a later aggregation round: the kept candidate for a trace that selected
        one, the trace's own text otherwise (docs/algorithm.md §6.4)."""
        return self.text if self.selected is None else self.selected


Seed = int | list[int]
"""One seed for the whole request, or one per prompt (``len(prompts)`` of them)."""


class RolloutEngine(Protocol):
    """Generates ``n`` completions for each prompt; the same seed gives the same completions.

    With one seed per prompt, a prompt's completions do not depend on the other prompts of the
    request either (up to floating point, see :mod:`spiral_lit.rollout.kv_cache`): evaluation relies
    on it so that a problem's rollouts are the same whichever batch or rank it lands in (docs/algorithm.md §7.1).
    """

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: Seed
    ) -> list[list[Completion]]: ...


def check_seeds(prompts: list[list[int]], seed: Seed) -> None:
    """Raise unless ``seed`` is an int or a list with one seed per prompt."""
    if isinstance(seed, list) and len(seed) != len(prompts):
        raise ValueError(f"generate: got {len(seed)} seeds for {len(prompts)} prompts; give one per prompt or an int")
