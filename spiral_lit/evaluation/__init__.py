"""Evaluation of the test-time scaffolds: held-out metrics, predict, compare, plots and rollout text."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """``from spiral_lit.evaluation import EvalConfig``: the flat layout's module, now ``evaluation.held_out``."""
    held_out = importlib.import_module("spiral_lit.evaluation.held_out")
    if name.startswith("_") or not hasattr(held_out, name):
        raise AttributeError(f"module 'spiral_lit.evaluation' has no attribute {name!r}")
    return getattr(held_out, name)
