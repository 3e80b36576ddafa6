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
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


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

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class RolloutEngine(Protocol):
    """Generates ``n`` completions for each prompt; the same seed gives the same completions."""

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: int
    ) -> list[list[Completion]]: ...
