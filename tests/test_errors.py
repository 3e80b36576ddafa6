"""A :class:`UserError` reaches the user as one paragraph and exit status 2, without a traceback unless
``SPIRAL_LIT_DEBUG=1``: raised directly, or from a config dataclass or class that jsonargparse instantiates and
wraps into its own error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT, cli_config

from spiral_lit.cli import main
from spiral_lit.errors import PathNotFoundError, UserError, find_user_error, run_main
from spiral_lit.tasks.chain_sum import ChainSumTask
from spiral_lit.training.step_config import AlgorithmConfig


class RefusingTask(ChainSumTask):
    """A task whose constructor refuses its argument, as a task with a bad data path does."""

    def __init__(self, n_terms: int = 2) -> None:
        raise UserError(f"data.task.init_args.n_terms={n_terms}: refused by the test task; give 3.")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    monkeypatch.delenv("SPIRAL_LIT_DEBUG", raising=False)


def _exit_code(call: object, capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_main(call)  # type: ignore[arg-type]
    return exit_info.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------- run_main
def test_user_error_is_found_behind_wrappers() -> None:
    cause = UserError("x must be >= 1")
    try:
        try:
            raise cause
        except UserError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert find_user_error(outer) is cause
    assert find_user_error(RuntimeError("a bug")) is None
    assert isinstance(PathNotFoundError("gone"), FileNotFoundError)


def test_user_error_prints_one_paragraph_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse() -> None:
        raise UserError("data.batch_size must be >= 1, got 0; set data.batch_size in the YAML.")

    code, err = _exit_code(refuse, capsys)
    assert code == 2
    assert err == "error: data.batch_size must be >= 1, got 0; set data.batch_size in the YAML.\n"


def test_debug_switch_shows_the_traceback(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIRAL_LIT_DEBUG", "1")

    def refuse() -> None:
        raise UserError("bad key")

    code, err = _exit_code(refuse, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.endswith("error: bad key\n")


def test_other_errors_keep_their_traceback() -> None:
    def bug() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_main(bug)
    assert run_main(lambda: 7) == 7


# ----------------------------------------------------------------------------- through LightningCLI
@pytest.fixture
def config(tiny_policy, tmp_path: Path) -> Path:
    return cli_config(tiny_policy.path, tmp_path, verifier_workers=0)


def test_user_error_of_a_config_dataclass_is_unwrapped(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """jsonargparse re-raises a dataclass's error as "Does not validate against any of the Union subtypes ..."."""

    def refuse(self: AlgorithmConfig) -> None:
        raise UserError(f"algorithm.n_search must be >= 1, got {self.n_search}")

    monkeypatch.setattr(AlgorithmConfig, "__post_init__", refuse)
    args = ["fit", "--config", str(config), "--model.init_args.algorithm.n_search", "0"]
    code, err = _exit_code(lambda: main(args), capsys)
    assert (code, err) == (2, "error: algorithm.n_search must be >= 1, got 0\n")


def test_user_error_of_a_class_init_is_unwrapped(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(config), "--data.task", f"{__name__}.RefusingTask"]
    code, err = _exit_code(lambda: main(args), capsys)
    assert (code, err) == (2, "error: data.task.init_args.n_terms=2: refused by the test task; give 3.\n")


# ----------------------------------------------------------------------------- every entry point, as users run it
def _run(module: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPIRAL_LIT_DEBUG": "1" if debug else "0"}
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("spiral_lit", ["fit", "--config", "{tmp}/empty.yaml"], r"--config '.*empty.yaml' is empty"),
        (
            "spiral_lit.tools.tiny",
            ["--out", "{tmp}/tiny", "--n_corpus_problems", "0"],
            r"--n_corpus_problems must be >= 1",
        ),
        ("spiral_lit.tools.convert_gguf", ["--gguf", "{tmp}/nope.gguf"], r"--gguf '.*nope.gguf' is not a file"),
    ],
)
def test_entry_points_print_user_errors_without_traceback(
    tmp_path: Path, module: str, args: list[str], message: str
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    result = _run(module, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert re.search(message, last), last


def test_debug_switch_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    result = _run("spiral_lit", "fit", "--config", str(tmp_path / "empty.yaml"), debug=True)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "is empty" in result.stderr.strip().splitlines()[-1]
