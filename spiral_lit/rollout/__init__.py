"""Rollout engines behind one interface (see :mod:`spiral_lit.rollout.base`).

:func:`make_engine` is the one place the ``backend`` option is dispatched.
"""

from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig, Seed
from spiral_lit.rollout.engine import KVCacheEngine
from spiral_lit.rollout.hf import HFGenerateEngine

Backend = Literal["hf", "kv_cache"]
"""``hf``: ``model.generate`` (the reference); ``kv_cache``: our engine (shared prefill, compaction; issue 5)."""


def make_engine(
    backend: Backend, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 256
) -> RolloutEngine:
    """The rollout engine for ``backend``."""
    if backend == "hf":
        return HFGenerateEngine(model, tokenizer, max_batch_size)
    if backend == "kv_cache":
        return KVCacheEngine(model, tokenizer, max_batch_size)
    raise ValueError(f"rollout backend={backend!r}; allowed: 'hf', 'kv_cache'")


__all__ = [
    "Backend",
    "Completion",
    "FinishReason",
    "HFGenerateEngine",
    "KVCacheEngine",
    "RolloutEngine",
    "SamplingConfig",
    "Seed",
    "make_engine",
]
