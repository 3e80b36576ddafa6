"""End to end through the CLI: warm start for 2 steps, then SPIRAL for 1 step from its export.

The shipped quickstart YAMLs are used with only sizes and paths overridden, so this is
the pipeline a user runs, shrunk to seconds.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from spiral_lit.cli import check_config_file, main
from spiral_lit.errors import PathNotFoundError, UserError

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
        ["fit", "--config", "experiments/quickstart/warmstart.yaml", *SMALL,
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

    main(
        ["fit", "--config", "experiments/quickstart/spiral.yaml", *SMALL, "--trainer.max_steps", "1",
         "--model.init_args.policy.path", str(warm / "hf"), "--data.batch_size", "2",
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
    assert (spiral / "hf" / "model.safetensors").is_file()


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
        check_config_file("experiments/quickstart/spiral.yml")


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
