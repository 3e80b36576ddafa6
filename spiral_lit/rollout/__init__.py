"""Rollout engines behind one interface (see :mod:`spiral_lit.rollout.base`).

The ``backend`` option is decided here and only here: :data:`BACKENDS` says how each backend is built and what it
supports, :func:`check_backend` refuses a combination it does not, :func:`make_engine` builds the engine.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.errors import UserError
from spiral_lit.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig, Seed
from spiral_lit.rollout.hf import HFGenerateEngine
from spiral_lit.rollout.kv_cache import KVCacheEngine
from spiral_lit.rollout.vllm_engine import VLLMConfig, VLLMEngine

Backend = Literal["hf", "kv_cache", "vllm"]
"""``hf``: ``model.generate`` (the reference); ``kv_cache``: our engine (shared prefill, compaction);
``vllm``: a colocated vLLM engine with its own copy of the weights, synced after updates (optional extra)."""


@dataclass(frozen=True)
class BackendSpec:
    """How one backend is built and what it supports."""

    build: Callable[[PreTrainedModel, PreTrainedTokenizerBase, int, VLLMConfig | None], RolloutEngine]
    """(model, tokenizer, max_batch_size, vllm settings) -> the engine."""
    decodes_sharded: bool
    """Decodes a policy sharded with FSDP, whose every forward is a collective. The ``kv_cache`` and ``vllm``
    engines' decode loops and fused weights assume unsharded modules."""


BACKENDS: dict[str, BackendSpec] = {
    "hf": BackendSpec(lambda model, tok, batch, vllm: HFGenerateEngine(model, tok, batch), decodes_sharded=True),
    "kv_cache": BackendSpec(lambda model, tok, batch, vllm: KVCacheEngine(model, tok, batch), decodes_sharded=False),
    "vllm": BackendSpec(lambda model, tok, batch, vllm: VLLMEngine(model, tok, batch, vllm), decodes_sharded=False),
}


def check_backend(backend: Backend, sharding: str = "none") -> BackendSpec:
    """``backend``'s spec, or a :class:`UserError` naming the key when it is unknown or cannot decode a policy
    sharded with ``sharding`` (``none``, ``fsdp1`` or ``fsdp2``). Cheap: run it before loading the policy."""
    spec = BACKENDS.get(backend)
    if spec is None:
        raise UserError(f"rollout backend={backend!r}; allowed: 'hf', 'kv_cache', 'vllm'")
    if sharding != "none" and not spec.decodes_sharded:
        raise UserError(
            f"model.rollout_backend={backend!r} cannot decode a policy sharded with FSDP ({sharding}): its "
            "decode loop and fused weights assume unsharded modules; set model.rollout_backend: hf"
        )
    return spec


def make_engine(
    backend: Backend,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_batch_size: int = 256,
    vllm: VLLMConfig | None = None,
) -> RolloutEngine:
    """The rollout engine for ``backend``; ``vllm`` configures the ``vllm`` backend only."""
    return check_backend(backend).build(model, tokenizer, max_batch_size, vllm)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSpec",
    "Completion",
    "FinishReason",
    "HFGenerateEngine",
    "KVCacheEngine",
    "RolloutEngine",
    "SamplingConfig",
    "Seed",
    "VLLMConfig",
    "VLLMEngine",
    "check_backend",
    "make_engine",
]
