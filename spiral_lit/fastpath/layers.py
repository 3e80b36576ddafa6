"""Layers that both fast paths (the fused decode step and the fused shared-prefix forward) compute themselves."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

_RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})


def rms_norm(norm: nn.Module, x_BE: torch.Tensor) -> torch.Tensor:
    """``norm(x_BE)``; for these models' hook-free fp32 RMSNorm, ``F.rms_norm`` (bitwise equal, fewer dispatches)."""
    if (
        type(norm).__name__ in _RMS_NORM_CLASSES
        and not (norm._forward_hooks or norm._forward_pre_hooks)
        and x_BE.dtype == norm.weight.dtype == torch.float32
    ):
        weight = cast(torch.Tensor, norm.weight)
        return F.rms_norm(x_BE, weight.shape, weight, cast(float, norm.variance_epsilon))
    return norm(x_BE)
