"""Rollout engines behind one interface (see :mod:`spiral_lit.rollout.base`)."""

from spiral_lit.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig
from spiral_lit.rollout.hf import HFGenerateEngine

__all__ = ["Completion", "FinishReason", "HFGenerateEngine", "RolloutEngine", "SamplingConfig"]
