"""The package's import direction is part of its design: data flows from the CLI to the training and evaluation
layers, which ask the rollout layer for traces, the tasks for rewards and the algorithms for advantages and
losses; nothing below imports what is above it. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spiral_lit"

LIGHTNING_FREE = ("algorithms", "tasks", "rollout", "fastpath", "runtime", "prompts", "scaffolds", "errors")
"""Subpackages and modules that must not import Lightning (only training, evaluation, reliability, tools, cli do)."""

ALLOWED = {
    "algorithms": {"algorithms"},
    "tasks": {"tasks", "errors"},
    "prompts": {"tasks", "errors"},
    "scaffolds": {"algorithms", "tasks", "prompts", "rollout", "errors"},
    "fastpath": {"fastpath"},
    "rollout": {"rollout", "fastpath", "errors"},
    "runtime": {"runtime", "rollout", "tasks", "prompts", "errors"},
}
"""Part of the package -> the parts it may import (parts not listed here may import anything)."""

THIRD_PARTY_FORBIDDEN = {
    "algorithms": ("lightning", "transformers", "peft"),
    "tasks": ("lightning", "transformers", "torch"),
}


def imports_of(source: str) -> set[str]:
    """Every module ``source`` imports, at any depth (``from x import y`` gives ``x``; relative imports are refused)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports make the direction harder to read; use absolute ones"
            found.add(node.module or "")
    return found


def part_of(module: str) -> str | None:
    """``spiral_lit.rollout.hf`` -> ``rollout``; ``spiral_lit`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "spiral_lit" else None


def violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` that break the rules above."""
    part, out = part_of(module), []
    for imported in sorted(imports_of(source)):
        target = part_of(imported)
        if part in ALLOWED and target is not None and target not in ALLOWED[part] and target != "_moved":
            out.append(f"{module} imports {imported} ({part} may import only {sorted(ALLOWED[part])})")
        top = imported.split(".")[0]
        if part in LIGHTNING_FREE and top in ("lightning", "pytorch_lightning"):
            out.append(f"{module} imports {imported} ({part} must not depend on Lightning)")
        if top in THIRD_PARTY_FORBIDDEN.get(part or "", ()):
            out.append(f"{module} imports {imported} ({part} must not depend on {top})")
    return out


def _modules() -> list[tuple[str, Path]]:
    return [
        (".".join(("spiral_lit", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"), path)
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_imports_point_the_right_way() -> None:
    found = [v for module, path in _modules() for v in violations(module, path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("spiral_lit.algorithms.advantages", "from spiral_lit.tasks.base import Problem"),
        ("spiral_lit.algorithms.losses", "import lightning as L"),
        ("spiral_lit.tasks.countdown", "from spiral_lit.training.update import PolicyUpdater"),
        ("spiral_lit.tasks.chain_sum", "import transformers"),
        ("spiral_lit.rollout.hf", "from lightning.pytorch import Trainer"),
        ("spiral_lit.rollout.kv_cache", "from spiral_lit.training.batching import pack"),
        ("spiral_lit.fastpath.decode", "from spiral_lit.rollout.base import Completion"),
    ],
)
def test_a_planted_wrong_import_is_caught(module: str, planted: str) -> None:
    path = dict(_modules())[module]
    inside_a_function = f"\n\ndef _planted() -> None:\n    {planted}\n"
    assert violations(module, path.read_text() + inside_a_function)


def test_every_module_is_short() -> None:
    long = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (split along a concept): {long}"
