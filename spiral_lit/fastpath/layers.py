"""Layers that both fast paths (the fused decode step and the fused shared-prefix forward) compute themselves."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm"})
"""RMSNorms computing ``weight * (x / rms(x)).to(dtype)`` in float32, with ``weight`` and ``variance_epsilon``."""


def rms_norm(norm: nn.Module, x_BE: torch.Tensor) -> torch.Tensor:
    """``norm(x_BE)``; for these models' hook-free fp32 RMSNorm, ``F.rms_norm`` (bitwise equal, fewer dispatches)."""
    if (
        type(norm).__name__ in RMS_NORM_CLASSES
        and not (norm._forward_hooks or norm._forward_pre_hooks)
        and x_BE.dtype == norm.weight.dtype == torch.float32
    ):
        weight = cast(torch.Tensor, norm.weight)
        return F.rms_norm(x_BE, weight.shape, weight, cast(float, norm.variance_epsilon))
    return norm(x_BE)


def head_rms_norm(x_NHD: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A :data:`RMS_NORM_CLASSES` norm over each head of ``x_NHD``, its ``weight`` given in the heads' dim order.

    For Qwen3's q/k norms on heads whose dims the fast paths permute: the mean square is the same in any order,
    but the elementwise weight must be permuted alike, so the module itself cannot be called. ``weight`` may
    also be ``[H, D]`` (one row per head, e.g. Q's and K's weights stacked). Normalised in float32 and cast back
    before the weight, as the module does.
    """
    normed = F.rms_norm(x_NHD.float(), x_NHD.shape[-1:], None, eps)
    return weight * normed.to(x_NHD.dtype)
