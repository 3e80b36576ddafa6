"""The training forward of a model (its logits over completion tokens), chosen once per model when the updater is
built, never per micro-batch (docs/algorithm.md §8.2):

- ``fused_prefix``: each distinct prompt once, written out over the model's own modules without per-row prompt
  copies (:func:`spiral_lit.fastpath.fused_prefix.fused_prefix_logits`; Llama-family models on CPU);
- ``shared_prefix``: each distinct prompt once, through the model's own ``forward`` with a KV cache
  (:func:`spiral_lit.training.prefix_forward.shared_prefix_logits`);
- ``full``: every row as ``prompt + completion`` through the model's ``forward``.

``update.shared_prefix`` asks for one of the first two: :func:`shared_prefix_cache` says whether the policy
supports it (else the full forward, with a warning naming why), and :func:`training_forward` picks the fused path
for each model that :func:`~spiral_lit.fastpath.fused_prefix.fused_prefix_refusal` accepts. All three give the same
log-probs and gradients up to rounding (tests/training/test_prefix_forward.py, tests/fastpath/test_fused_prefix.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from spiral_lit.fastpath.decode import log_fallback_once
from spiral_lit.fastpath.fused_prefix import fused_prefix_logits, fused_prefix_refusal
from spiral_lit.training.batching import PackedBatch
from spiral_lit.training.prefix_forward import CacheForward, shared_prefix_logits, shared_prefix_support

logger = logging.getLogger(__name__)

ForwardPath = Literal["fused_prefix", "shared_prefix", "full"]


def full_logits(model: Callable[..., Any], batch: PackedBatch) -> torch.Tensor:
    """Logits ``[B, T-1, V]`` of ``prompt + completion`` rows, aligned with ``batch.targets_BT1``.

    The rows are right-padded (:func:`~spiral_lit.training.batching.pack`), so no real token attends to a pad:
    the causal mask alone gives the real tokens' logits, and the padding mask is left out. Attention then runs
    sdpa's causal kernel, which skips the masked half of the score blocks, instead of the kernel that reads a
    ``[B, 1, T, T]`` mask. Logits at pad positions change, and nothing reads them (the completion mask excludes
    them)."""
    mask = None if is_right_padded(batch.attention_mask_BT) else batch.attention_mask_BT
    return model(input_ids=batch.input_ids_BT, attention_mask=mask).logits[:, :-1]


def is_right_padded(attention_mask_BT: torch.Tensor) -> bool:
    """Whether every row is ones then zeros (real tokens first, pads after)."""
    return bool((attention_mask_BT[:, 1:] <= attention_mask_BT[:, :-1]).all())


def shared_prefix_cache(model: torch.nn.Module, wanted: bool) -> CacheForward | None:
    """How the shared-prefix forward passes ``model`` a KV cache, or None for the full forward: not ``wanted``
    (``update.shared_prefix: false``), or refused, with a warning that names why."""
    if not wanted:
        return None
    support = shared_prefix_support(model)
    if isinstance(support, str):
        warnings.warn(f"update.shared_prefix: {support}; using the full forward", stacklevel=3)
        return None
    return support


@dataclass(frozen=True)
class TrainingForward:
    """One model's forward along the path chosen for it."""

    path: ForwardPath
    logits: Callable[[Any], torch.Tensor]
    """A packed batch (``SharedPrefixBatch`` on the prefix paths, ``PackedBatch`` on the full one) -> its logits."""


def training_forward(model: Callable[..., Any], cache: CacheForward | None) -> TrainingForward:
    """The forward of ``model`` (the policy, or the KL reference): full without a ``cache``, else fused where
    :func:`fused_prefix_refusal` accepts the model, else the shared prefix through its own ``forward`` (logging
    why, once per reason)."""
    if cache is None:
        return TrainingForward("full", lambda batch: full_logits(model, batch))
    reason = fused_prefix_refusal(model)
    if reason is None and isinstance(model, torch.nn.Module):  # no per-row prompt copies
        return TrainingForward("fused_prefix", lambda batch: fused_prefix_logits(model, batch))
    log_fallback_once(
        logger, f"fused prefix forward not used: {reason}; using the shared prefix through the model's forward"
    )
    return TrainingForward("shared_prefix", lambda batch: shared_prefix_logits(model, batch, cache))
