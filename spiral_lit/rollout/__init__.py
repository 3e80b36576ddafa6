"""Rollout engines behind one interface (see :mod:`spiral_lit.rollout.base`).

:func:`make_engine` is the one place the ``backend`` option is dispatched.
"""

from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.errors import UserError
from spiral_lit.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig, Seed
from spiral_lit.rollout.hf import HFGenerateEngine
from spiral_lit.rollout.kv_cache import KVCacheEngine
from spiral_lit.rollout.vllm_engine import VLLMConfig, VLLMEngine

Backend = Literal["hf", "kv_cache", "vllm"]
"""``hf``: ``model.generate`` (the reference); ``kv_cache``: our engine (shared prefill, compaction; issue 5);
``vllm``: a colocated vLLM engine with its own copy of the weights, synced after updates (issue 10; optional extra)."""


def make_engine(
    backend: Backend,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_batch_size: int = 256,
    vllm: VLLMConfig | None = None,
) -> RolloutEngine:
    """The rollout engine for ``backend``; ``vllm`` configures the ``vllm`` backend only."""
    if backend == "hf":
        return HFGenerateEngine(model, tokenizer, max_batch_size)
    if backend == "kv_cache":
        return KVCacheEngine(model, tokenizer, max_batch_size)
    if backend == "vllm":
        return VLLMEngine(model, tokenizer, max_batch_size, vllm)
    raise UserError(f"rollout backend={backend!r}; allowed: 'hf', 'kv_cache', 'vllm'")


__all__ = [
    "Backend",
    "Completion",
    "FinishReason",
    "HFGenerateEngine",
    "KVCacheEngine",
    "RolloutEngine",
    "SamplingConfig",
    "Seed",
    "VLLMConfig",
    "VLLMEngine",
    "make_engine",
]
