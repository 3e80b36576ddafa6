"""preflight.py: before any model is loaded, a run refuses greedy training sampling, output locations it cannot
write, and a model directory without weights, each naming the YAML key and the path."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from tiny_run import cli_config, edited_policy_copy

from spiral_lit.cli import SpiralCLI, main
from spiral_lit.errors import UserError
from spiral_lit.reliability.preflight import check_cpu_precision, check_writable, preflight


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model weights were loaded before the bad input was refused")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", refuse)


@pytest.fixture
def config(tiny_policy, tmp_path: Path) -> Path:
    return cli_config(tiny_policy.path, tmp_path, verifier_workers=0)


def _built(config: Path, *args: str) -> SpiralCLI:
    """The CLI's objects (model, data, trainer) without running a subcommand: nothing is loaded yet."""
    return main(["--config", str(config), *args], run=False)


def _preflight(cli: SpiralCLI, stage: str) -> None:
    preflight(cli.model, cli.datamodule, cli.trainer, stage)


# ----------------------------------------------------------------------------- training sampling
def test_greedy_training_is_refused_but_greedy_evaluation_is_not(config: Path, no_model_load) -> None:
    cli = _built(config, "--model.init_args.search_sampling.temperature", "0")
    with pytest.raises(UserError, match=r"search_sampling\.temperature=0"):
        _preflight(cli, "fit")
    _preflight(cli, "validate")


def test_greedy_aggregation_training_is_refused(config: Path, no_model_load) -> None:
    cli = _built(config, "--model.init_args.aggregation_sampling.temperature", "0")
    with pytest.raises(UserError, match=r"aggregation_sampling\.temperature=0"):
        _preflight(cli, "fit")


def test_one_aggregation_per_set_is_refused_when_the_config_is_read(config: Path, no_model_load) -> None:
    with pytest.raises(ValueError, match=r"algorithm\.n_agg=1: .*aggregator never learns"):
        _built(config, "--model.init_args.algorithm.n_agg", "1")


# ----------------------------------------------------------------------------- writable outputs
def test_check_writable_accepts_a_new_path_and_leaves_nothing_behind(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b", "some.key")
    check_writable(tmp_path, "some.key")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_path_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=r"some\.key=.*afile/ckpt.*cannot create.*'.*afile' is a file"):
        check_writable(tmp_path / "afile" / "ckpt", "some.key")
    with pytest.raises(UserError, match=r"is a file, not a directory"):
        check_writable(tmp_path / "afile", "some.key")


def test_check_writable_refuses_a_directory_it_may_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        "spiral_lit.reliability.preflight.os.access", lambda p, mode: Path(p) != locked and real_access(p, mode)
    )
    with pytest.raises(UserError, match=r"some\.key=.*locked.*not writable"):
        check_writable(locked, "some.key")
    with pytest.raises(UserError, match=r"some\.key=.*locked/new.*cannot create.*below '.*locked': .*not writable"):
        check_writable(locked / "new", "some.key")


def test_check_writable_tries_what_permission_bits_do_not_tell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory where creating fails although ``os.access`` allows it (sysfs, root-squashed NFS)."""

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("spiral_lit.reliability.preflight.tempfile.mkdtemp", refuse)
    with pytest.raises(UserError, match=r"some\.key=.*/new.*nothing can be created in it \(Operation not permitted\)"):
        check_writable(tmp_path / "new", "some.key")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permission bits")
def test_check_writable_reads_permission_bits(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="not writable"):
        check_writable(locked / "checkpoints", "some.key")


def _with_callback_dirpath(config: Path, index: int, dirpath: str) -> None:
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"][index].setdefault("init_args", {})["dirpath"] = dirpath
    config.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("index", "key"),
    [
        (0, r"trainer\.callbacks\[ModelCheckpoint\]\.init_args\.dirpath"),
        (1, r"trainer\.callbacks\[HFExport\]\.init_args\.dirpath"),
    ],
)
def test_unwritable_checkpoint_and_export_dirs_fail_before_fit(
    config: Path, tmp_path: Path, index: int, key: str, no_model_load
) -> None:
    (tmp_path / "afile").write_text("")
    _with_callback_dirpath(config, index, str(tmp_path / "afile" / "out"))
    cli = _built(config)
    with pytest.raises(UserError, match=key + r"=.*afile/out"):
        _preflight(cli, "fit")
    _preflight(cli, "validate")  # validate writes no checkpoint and no export


def test_unwritable_logger_dir_fails_for_every_stage(config: Path, tmp_path: Path, no_model_load) -> None:
    (tmp_path / "afile").write_text("")
    cli = _built(config, "--trainer.logger.init_args.save_dir", str(tmp_path / "afile" / "logs"))
    for stage in ("fit", "validate"):
        with pytest.raises(UserError, match=r"trainer\.logger\.init_args\.save_dir=.*afile/logs"):
            _preflight(cli, stage)


def test_default_root_dir_is_checked_without_a_logger(config: Path, tmp_path: Path, no_model_load) -> None:
    (tmp_path / "afile").write_text("")
    root = str(tmp_path / "afile" / "root")
    cli = _built(config, "--trainer.logger", "false", "--trainer.default_root_dir", root)
    with pytest.raises(UserError, match=r"trainer\.default_root_dir=.*afile/root"):
        _preflight(cli, "fit")


# ----------------------------------------------------------------------------- model files
def test_policy_without_weights_fails_before_fit(tiny_policy, config: Path, tmp_path: Path, no_model_load) -> None:
    policy = tmp_path / "no_weights"
    policy.mkdir()
    for file in tiny_policy.path.iterdir():
        if file.name != "model.safetensors":
            (policy / file.name).write_bytes(file.read_bytes())
    cli = _built(config, "--model.init_args.policy.path", str(policy))
    with pytest.raises(UserError, match=r"no_weights'.*no weights"):
        _preflight(cli, "fit")


# ----------------------------------------------------------------------------- bf16 on a CPU without it


@pytest.mark.parametrize(("precision", "dtype", "speedup", "warns"), [
    ("bf16-mixed", "float32", 0.01, "trainer.precision is bf16-mixed, but"),
    ("32-true", "bfloat16", 0.01, "policy.dtype is bfloat16, but"),
    ("bf16-mixed", "bfloat16", 0.01, "trainer.precision is bf16-mixed and policy.dtype is bfloat16, but"),
    ("bf16-mixed", "bfloat16", 2.0, None),
    ("32-true", "float32", 0.01, None),
])  # fmt: skip
def test_bf16_on_a_cpu_that_runs_it_slowly_is_warned_about(
    config: Path, monkeypatch: pytest.MonkeyPatch, precision: str, dtype: str, speedup: float, warns: str | None
) -> None:
    timed: list[bool] = []
    monkeypatch.setattr("spiral_lit.reliability.preflight.bf16_speedup", lambda: timed.append(True) or speedup)
    cli = _built(config, "--trainer.precision", precision, "--model.init_args.policy.dtype", dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_cpu_precision(cli.trainer, cli.model.policy_config)
    slow = [str(w.message) for w in caught if "runs bf16 matmuls 100x slower than fp32" in str(w.message)]
    assert len(slow) == int(warns is not None)
    if warns is not None:
        assert slow[0].startswith(warns)
        assert ("--trainer.precision 32-true" in slow[0]) == (precision != "32-true")
        assert ("--model.init_args.policy.dtype float32" in slow[0]) == (dtype == "bfloat16")
    assert timed == ([True] if (precision, dtype) != ("32-true", "float32") else [])  # fp32 runs are not timed


@pytest.mark.parametrize(("stored", "warns"), [("bfloat16", True), ("float32", False)])
def test_auto_dtype_of_a_bf16_checkpoint_is_warned_about(
    tiny_policy, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str, warns: bool
) -> None:
    # Most hub models store bf16 weights, which `policy.dtype: auto` keeps.
    policy = edited_policy_copy(tiny_policy.path, tmp_path / "policy", "config.json", dtype=stored)
    monkeypatch.setattr("spiral_lit.reliability.preflight.bf16_speedup", lambda: 0.01)
    cli = _built(config, "--model.init_args.policy.path", str(policy), "--model.init_args.policy.dtype", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_cpu_precision(cli.trainer, cli.model.policy_config)
    slow = [str(w.message) for w in caught if "runs bf16 matmuls 100x slower than fp32" in str(w.message)]
    assert len(slow) == int(warns)
    if warns:
        assert slow[0].startswith(f"policy.dtype is auto and {policy / 'config.json'} stores bfloat16, but")
        assert "--model.init_args.policy.dtype float32" in slow[0]
