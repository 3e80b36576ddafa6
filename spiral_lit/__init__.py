"""spiral_lit: SPIRAL (Sequential-Parallel-Aggregative RL) on PyTorch Lightning.

The top-level names are imported lazily, so ``import spiral_lit.tasks`` (which every
verifier worker process does) does not pay for importing Lightning and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from spiral_lit import _moved

_moved.install()  # the flat layout's module paths (spiral_lit.module, spiral_lit.callbacks, ...) still import

__version__ = "0.1.0"
_EXPORTS = {
    "ProblemDataModule": "spiral_lit.training.data",
    "SpiralModule": "spiral_lit.training.spiral_module",
    "WarmStartModule": "spiral_lit.training.warm_start",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spiral_lit' has no attribute {name!r}")
