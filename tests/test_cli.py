"""End to end through the CLI: warm start for 2 steps, then SPIRAL for 1 step from its export; ``--config`` files;
one command line for the Trainer subcommands and the tools (``python -m spiral_lit compare ...``, ``spiral-lit``).

The shipped quickstart YAMLs are used with only sizes and paths overridden, so this is
the pipeline a user runs, shrunk to seconds.
"""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from spiral_lit.cli import TOOLS, check_config_file, console_main, main, run_alias
from spiral_lit.errors import PathNotFoundError, UserError
from spiral_lit.reliability.checkpointing import load_checkpoint_file

SMALL = [
    "--trainer.max_steps", "2", "--trainer.max_time", "null", "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
    "--data.heldout_size", "4", "--data.eval_batch_size", "4",
    "--data.task.init_args.n_terms", "2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["spiral_lit"])


def test_warm_start_then_spiral(tiny_policy, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    main(
        ["fit", "--config", "experiments/chain_sum/warmstart.yaml", *SMALL,
         "--model.init_args.policy.path", str(tiny_policy.path), "--data.batch_size", "8",
         "--model.init_args.eval.n_samples", "2", "--model.init_args.eval.pass_k", "[1, 2]",
         "--model.init_args.eval.set_size", "2", "--model.init_args.eval_sampling.max_new_tokens", "8",
         "--trainer.logger.init_args.save_dir", str(runs)]
    )  # fmt: skip
    warm = runs / "warmstart"
    assert (warm / "config.yaml").is_file()
    assert (warm / "checkpoints" / "last.ckpt").is_file()
    assert glob.glob(str(warm / "events.out.tfevents*"))
    resolved = yaml.safe_load((warm / "config.yaml").read_text())
    assert resolved["model"]["init_args"]["policy"]["path"] == str(tiny_policy.path)
    exported = AutoModelForCausalLM.from_pretrained(warm / "hf")
    before = AutoModelForCausalLM.from_pretrained(tiny_policy.path)
    changed = [not torch.equal(a, b) for a, b in zip(exported.parameters(), before.parameters(), strict=True)]
    assert all(changed)

    # A 2-step warm start never writes a right chain sum, so every reward would be 0 and SPIRAL would not move a
    # weight: VoteTask's hash-based verdicts give this seed's batch of 4 prompts signal (tests/hash_task.py).
    main(
        ["fit", "--config", "experiments/chain_sum/spiral.yaml", "--data.task", "hash_task.VoteTask", *SMALL,
         "--trainer.max_steps", "1", "--model.init_args.policy.path", str(warm / "hf"), "--data.batch_size", "4",
         "--model.init_args.algorithm.n_search", "4", "--model.init_args.algorithm.n_sets", "2",
         "--model.init_args.algorithm.set_size", "2", "--model.init_args.algorithm.n_agg", "2",
         "--model.init_args.search_sampling.max_new_tokens", "8",
         "--model.init_args.aggregation_sampling.max_new_tokens", "8",
         "--model.init_args.eval.n_samples", "2", "--model.init_args.eval.pass_k", "[1, 2]",
         "--model.init_args.eval.set_size", "2", "--trainer.val_check_interval", "1",
         "--trainer.logger.init_args.save_dir", str(runs)]
    )  # fmt: skip
    spiral = runs / "spiral"
    assert (spiral / "config.yaml").is_file()
    from fit_helpers import tensorboard_scalars

    scalars = tensorboard_scalars(str(spiral))
    for tag in ("reward/search", "reward/aggregation", "train/loss", "train/loss/search", "train/loss/aggregation"):
        assert scalars.get(tag) and all(torch.isfinite(torch.tensor(scalars[tag]))), (tag, scalars.get(tag))
    assert scalars["train/sequences"][-1] > 0 and scalars["train/grad_norm/total"][-1] > 0  # a real update ran
    trained = AutoModelForCausalLM.from_pretrained(spiral / "hf")
    warm_start = AutoModelForCausalLM.from_pretrained(warm / "hf")
    moved = [name for (name, a), b in zip(trained.named_parameters(), warm_start.parameters(), strict=True)
             if not torch.equal(a, b)]  # fmt: skip
    assert moved == [name for name, _ in warm_start.named_parameters()]  # every parameter moved in the SPIRAL step
    # The checkpoint a `--ckpt_path last` resumes from is the one after the update, not the warm start's weights.
    checkpoint = load_checkpoint_file(spiral / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 1
    saved = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    for name, param in trained.named_parameters():
        assert torch.equal(saved[name], param), name


# ----------------------------------------------------------------------------- --config files
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"--config '.*run.yaml' is empty \(or holds only comments\): expected a YAML mapping"),
        ("# trainer:\n#   max_steps: 1\n", r"--config '.*run.yaml' is empty"),
        ("- trainer\n- model\n", r"--config '.*run.yaml' holds a YAML list: expected a YAML mapping"),
        ("spiral.yaml\n", r"--config '.*run.yaml' holds a YAML single value \('spiral.yaml'\)"),
        ("trainer:\n\tmax_steps: 1\n", r"run.yaml', line 2, column 1: .*\(a tab: YAML indents with spaces only\)"),
        ("trainer:\n  max_steps: 1\n  logger: a: b\n", r"run.yaml', line 3, column 12: mapping values are not allowed"),
    ],
)
def test_bad_config_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "run.yaml").write_text(content)
    with pytest.raises(UserError, match=message):
        main(["fit", "--config", str(tmp_path / "run.yaml")], run=False)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PathNotFoundError, match=r"--config '.*nope.yaml': no such file"):
        main(["fit", f"--config={tmp_path / 'nope.yaml'}"])


def test_inline_config_is_left_to_jsonargparse() -> None:
    check_config_file("{trainer: {max_steps: 1}}")
    with pytest.raises(PathNotFoundError):
        check_config_file("experiments/chain_sum/spiral.yml")


def test_a_fresh_fit_refuses_a_run_directory_with_checkpoints(tiny_policy, tmp_path: Path) -> None:
    from tiny_run import cli_config

    config = cli_config(tiny_policy.path, tmp_path, verifier_workers=0)
    main(["fit", "--config", str(config), "--trainer.max_steps", "1"])
    run = tmp_path / "spiral"
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with pytest.raises(UserError, match=r"already holds last\.ckpt.*--ckpt_path last.*--overwrite"):
        main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    main(["fit", "--config", str(config), "--trainer.max_steps", "2", "--ckpt_path", "last"])  # continuing is fine
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", "--overwrite", "true"])  # so is asking


# ----------------------------------------------------------------------------- one command line
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_tool_named_first_gets_the_rest_of_the_command_line(tool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    given = []
    monkeypatch.setattr(importlib.import_module(TOOLS[tool][0]), "main", lambda argv: given.append(argv) or "done")
    assert main([tool, "--out", "x", "--config", "not-checked-here.yaml"]) == "done"
    assert given == [["--out", "x", "--config", "not-checked-here.yaml"]]


def test_help_lists_the_trainer_subcommands_and_the_tools() -> None:
    result = _run("-m", "spiral_lit", "--help")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^    (\w+) ", result.stdout, re.M)
    assert listed == ["fit", "validate", "test", "predict", *TOOLS]
    tool_help = _run("-m", "spiral_lit", "export", "--help")
    assert tool_help.returncode == 0 and tool_help.stdout.startswith("usage: python -m spiral_lit export")


def test_a_tool_user_error_exits_2_without_a_traceback(tmp_path: Path) -> None:
    result = _run("-m", "spiral_lit", "compare", "--config", "c.yaml", "--checkpoints", "no-name", "--out", "o")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoints entry 'no-name': expected name=path")
    assert "Traceback" not in result.stderr


def test_options_before_a_tool_name_are_refused() -> None:
    with pytest.raises(UserError, match=r"compare takes its own options, after its name: .*compare --help"):
        main(["--config", "{}", "compare"])


def test_the_console_script_is_main_through_run_main(monkeypatch: pytest.MonkeyPatch) -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["spiral-lit"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert entry is console_main
    monkeypatch.setattr(importlib.import_module(TOOLS["tiny"][0]), "main", lambda argv: Path("built"))
    monkeypatch.setattr("sys.argv", ["spiral-lit", "tiny"])
    assert entry() is None  # what a console script returns is its exit status: None is 0
    monkeypatch.setattr("sys.argv", ["spiral-lit", "fit", "--config", "missing.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 2


def test_a_tool_module_entry_point_warns_and_runs_the_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    given = []
    monkeypatch.setattr(importlib.import_module(TOOLS["export"][0]), "main", lambda argv: given.append(argv))
    monkeypatch.setattr("sys.argv", ["export.py", "--out", "x"])
    with pytest.warns(FutureWarning, match=r"python -m spiral_lit\.export is now `python -m spiral_lit export`"):
        run_alias("export", SimpleNamespace(name="spiral_lit.export"))
    assert given == [["--out", "x"]]


def test_given_args_do_not_warn_about_sys_argv(tiny_policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools build the run from their own arguments while ``sys.argv`` holds the tool's command line."""
    monkeypatch.setattr("sys.argv", ["spiral_lit", "export", "--ckpt_path", "x.ckpt"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LightningCLI's args parameter")
        config = "experiments/chain_sum/spiral.yaml"
        main(["--config", config, "--model.init_args.policy.path", str(tiny_policy.path)], run=False)


def test_no_module_of_the_package_imports_unittest() -> None:
    """Production code runs real Lightning calls; mocks belong to the tests."""
    found = []
    for path in sorted((ROOT / "spiral_lit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "unittest"]
    assert not found, found
