"""Every YAML under experiments/ parses with the project's CLI.

``fit --config X --print_config`` parses and validates the whole file (class paths, init
args, dataclass fields, links) and exits before anything is instantiated, so no model is
loaded and no dataset read. The parametrised checks run the CLI in-process (the imports
are paid once); one check goes through ``python -m spiral_lit`` as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spiral_lit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = sorted(ROOT.glob("experiments/**/tiny.yaml"))
"""Configs of ``python -m spiral_lit tiny`` (the tiny model's build), not of a run."""
CONFIGS = sorted(set(ROOT.glob("experiments/**/*.yaml")) - set(TINY_CONFIGS))


@pytest.fixture(autouse=True)
def _as_if_run_from_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when both ``args`` and ``sys.argv`` (here: pytest's own) are given.
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    monkeypatch.chdir(ROOT)


def _print_config(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def _misspell_n_search(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "experiments" / "chain_sum" / "spiral.yaml").read_text())
    algorithm = config["model"]["init_args"]["algorithm"]
    algorithm["n_serch"] = algorithm.pop("n_search")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    return bad


def test_there_are_configs_to_check() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_experiment_yaml_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _print_config(config, capsys)
    assert code == 0, err[-3000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] == yaml.safe_load(config.read_text())["model"]["class_path"]
    assert printed["data"]["task"]["class_path"].startswith("spiral_lit.tasks.")


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_tiny_model_yaml_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", "--config", str(config), "--print_config"])
    out, err = capsys.readouterr()
    assert (exit_info.value.code or 0) == 0, err[-3000:]
    assert yaml.safe_load(out)["task"]["class_path"].startswith("spiral_lit.tasks.")


def test_misspelled_key_fails_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _print_config(_misspell_n_search(tmp_path), capsys)
    assert code != 0
    assert "Option 'n_serch' is not accepted" in err


def test_module_entry_point_rejects_a_misspelled_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spiral_lit", "fit", "--config", str(_misspell_n_search(tmp_path)), "--print_config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "n_serch" in result.stderr
    assert result.stdout == ""
