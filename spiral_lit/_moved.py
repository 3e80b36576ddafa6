"""Old module paths of the flat layout (before the subpackages), kept importable for one release.

A YAML ``class_path: spiral_lit.callbacks.HFExport``, ``python -m spiral_lit.compare`` and
``from spiral_lit.module import SpiralModule`` still work: an import of an old path returns the module at its
new path (the same module object, so classes and functions are identical) with a ``FutureWarning`` that names
the new spelling. Nothing is imported until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

MOVED = {
    "spiral_lit.module": "spiral_lit.training.spiral_module",
    "spiral_lit.sft": "spiral_lit.training.warm_start",
    "spiral_lit.update": "spiral_lit.training.update",
    "spiral_lit.batching": "spiral_lit.training.batching",
    "spiral_lit.prefix_forward": "spiral_lit.training.prefix_forward",
    "spiral_lit.experience": "spiral_lit.training.experience",
    "spiral_lit.step_config": "spiral_lit.training.step_config",
    "spiral_lit.rank_passes": "spiral_lit.training.rank_passes",
    "spiral_lit.data": "spiral_lit.training.data",
    "spiral_lit.fused_prefix": "spiral_lit.fastpath.fused_prefix",
    "spiral_lit.rollout.decode": "spiral_lit.fastpath.decode",
    "spiral_lit.rollout.attention": "spiral_lit.fastpath.attention",
    "spiral_lit.rollout.engine": "spiral_lit.rollout.kv_cache",
    "spiral_lit.models": "spiral_lit.runtime.models",
    "spiral_lit.model_files": "spiral_lit.runtime.model_files",
    "spiral_lit.policy": "spiral_lit.runtime.policy",
    "spiral_lit.sharding": "spiral_lit.runtime.sharding",
    "spiral_lit.lora": "spiral_lit.runtime.lora",
    "spiral_lit.cpu_memory": "spiral_lit.training.cpu_memory",
    "spiral_lit.metrics": "spiral_lit.evaluation.metrics",
    "spiral_lit.predict": "spiral_lit.evaluation.predict",
    "spiral_lit.compare": "spiral_lit.evaluation.compare",
    "spiral_lit.plots": "spiral_lit.evaluation.plots",
    "spiral_lit.rollout_text": "spiral_lit.evaluation.rollout_text",
    "spiral_lit.checkpointing": "spiral_lit.reliability.checkpointing",
    "spiral_lit.faults": "spiral_lit.reliability.faults",
    "spiral_lit.preflight": "spiral_lit.reliability.preflight",
    "spiral_lit.output_paths": "spiral_lit.reliability.output_paths",
    "spiral_lit.progress": "spiral_lit.reliability.progress",
    "spiral_lit.callbacks": "spiral_lit.reliability.callbacks",
    "spiral_lit.tiny": "spiral_lit.tools.tiny",
    "spiral_lit.convert_gguf": "spiral_lit.tools.convert_gguf",
    "spiral_lit.export": "spiral_lit.tools.export",
}
"""Old module path -> new module path."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds old paths and loads them as the module at the new path."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        target = importlib.util.find_spec(MOVED[fullname])  # its file: runpy puts it in sys.argv[0]
        return importlib.util.spec_from_loader(fullname, self, origin=target.origin if target else None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        if spec.name != "__main__":
            warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", FutureWarning, 2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        """For ``python -m <old path>``: the code of the new module (runpy runs it as ``__main__``)."""
        spec = importlib.util.find_spec(MOVED[fullname])
        assert spec is not None and spec.loader is not None
        return spec.loader.get_code(spec.name)  # type: ignore[attr-defined]


def install() -> None:
    """Let old paths import (once per interpreter)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
