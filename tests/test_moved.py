"""The flat layout's module paths still work for one release: imports, YAML class paths and ``python -m``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spiral_lit._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]


def test_old_paths_are_the_new_modules() -> None:
    import importlib

    for old, new in MOVED.items():
        with pytest.warns(FutureWarning, match=new):
            sys.modules.pop(old, None)
            assert importlib.import_module(old) is importlib.import_module(new)


def test_the_old_evaluation_module_names_resolve_in_its_package() -> None:
    from spiral_lit.evaluation import EvalConfig, held_out

    assert EvalConfig is held_out.EvalConfig


def test_an_old_class_path_in_yaml_still_parses(tiny_policy, tmp_path: Path) -> None:
    from spiral_lit.cli import main

    config = yaml.safe_load((ROOT / "experiments" / "chain_sum" / "spiral.yaml").read_text())
    config["model"]["init_args"]["policy"]["path"] = str(tiny_policy.path)
    config["trainer"]["callbacks"][-1]["class_path"] = "spiral_lit.callbacks.HFExport"  # the flat layout's path
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["--config", str(path)], run=False)
    assert any(type(c).__module__ == "spiral_lit.reliability.callbacks" for c in cli.trainer.callbacks)


@pytest.mark.parametrize("module", ["spiral_lit.tiny", "spiral_lit.compare", "spiral_lit.export"])
def test_old_entry_points_run(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout
