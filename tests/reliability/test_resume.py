"""Exact resume (docs/algorithm.md §8.4): N steps + resume for N more ends where 2N uninterrupted steps end.

Every comparison is of the final weights (max abs difference, expected exactly 0 on CPU and at most
1e-6) and of the logged rewards and losses at every step (TensorBoard). The stops are real: a run
that ends at ``max_steps``, SIGTERM and SIGINT delivered to this process (Lightning's and our
handlers act on them), a full disk while a checkpoint is written, and, marked slow, SIGTERM sent to a
``python -m spiral_lit fit`` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import HalfSignalTask, SignalAt, cli_config, fit, make_module, max_abs_diff, scalars

from spiral_lit.reliability.checkpointing import AtomicCheckpointIO, CheckpointWriteError, load_checkpoint_file
from spiral_lit.training.spiral_module import AlgorithmConfig

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6
STEPS = 4


def _same_run(a: Path, b: Path, module_a: torch.nn.Module, module_b: torch.nn.Module) -> float:
    """Assert that two runs logged the same rewards and losses at every step; return their weight difference."""
    for tag in ("reward", "train/loss", "reward/search"):
        assert scalars(a, tag) == scalars(b, tag), tag
    assert len(scalars(a, "reward")) >= STEPS
    return max_abs_diff(module_a.policy, module_b.policy)


@pytest.fixture(scope="module")
def dropout_policy(tiny_policy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy with attention dropout: training then draws from the global torch RNG, as real models can."""
    out = tmp_path_factory.mktemp("dropout_policy")
    for file in tiny_policy.path.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.1}))
    return out


@pytest.fixture(scope="module")
def reference(tiny_policy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """STEPS uninterrupted steps on the tiny policy."""
    root = tmp_path_factory.mktemp("reference")
    module = make_module(tiny_policy.path)
    fit(root, module, STEPS)
    return root, module


def test_n_steps_then_resume_equals_2n_steps_with_dropout(dropout_policy: Path, tmp_path: Path) -> None:
    uninterrupted = make_module(dropout_policy)
    fit(tmp_path / "a", uninterrupted, STEPS)
    first = make_module(dropout_policy)
    fit(tmp_path / "b", first, STEPS // 2)
    resumed = make_module(dropout_policy)
    fit(tmp_path / "b", resumed, STEPS, ckpt_path="last")
    assert resumed.global_step == STEPS
    assert max_abs_diff(first.policy, resumed.policy) > 1e-4  # the resumed steps did train
    assert _same_run(tmp_path / "a", tmp_path / "b", uninterrupted, resumed) <= TOLERANCE


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_saves_a_checkpoint_that_resumes_exactly(reference, tiny_policy, tmp_path: Path, signum) -> None:
    stopped = make_module(tiny_policy.path)
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, stopped, STEPS, callbacks=[SignalAt(batch=1, signum=signum)])
    assert exit_info.value.code == 128 + signum
    checkpoint = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2  # stopped at the end of the step it was in (batch 1)
    assert len(checkpoint["rng_states_per_rank"]) == 1
    resumed = make_module(tiny_policy.path)
    fit(tmp_path, resumed, STEPS, ckpt_path="last")
    ref_root, ref_module = reference
    assert _same_run(ref_root, tmp_path, ref_module, resumed) <= TOLERANCE


def test_sigterm_while_dynamic_sampling_refills_keeps_the_pending_sequences(tiny_policy, tmp_path: Path) -> None:
    def module():  # noqa: ANN202
        algorithm = AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2, max_refill_batches=2)
        return make_module(tiny_policy.path, HalfSignalTask(n_terms=2, digits=2), algorithm=algorithm)

    uninterrupted = module()
    fit(tmp_path / "a", uninterrupted, STEPS)
    stopped = module()
    with pytest.raises(SystemExit):
        # Batch 3 keeps one of its two prompts, so it waits for a refill with that prompt's sequences pending.
        fit(tmp_path / "b", stopped, STEPS, callbacks=[SignalAt(batch=3)])
    checkpoint = load_checkpoint_file(tmp_path / "b" / "checkpoints" / "last.ckpt")
    pending = checkpoint["spiral_lit"]["pending_per_rank"][0]
    assert checkpoint["global_step"] == 1
    assert (len(pending["sequences"]), pending["prompts"], pending["batches"]) == (8, 1, 1)  # 4 search + 2 x 2 agg
    resumed = module()
    fit(tmp_path / "b", resumed, STEPS, ckpt_path="last")
    assert _same_run(tmp_path / "a", tmp_path / "b", uninterrupted, resumed) <= TOLERANCE


class FullDisk(AtomicCheckpointIO):
    """Checkpoint IO whose disk fills up after half of every checkpoint is written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:  # noqa: ANN001
        real_save = torch.save

        def half_then_full(obj, f) -> None:  # noqa: ANN001
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            raise OSError(28, "No space left on device")

        torch.save = half_then_full
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


def test_full_disk_reports_and_keeps_the_previous_checkpoint(reference, tiny_policy, tmp_path: Path) -> None:
    fit(tmp_path, make_module(tiny_policy.path), STEPS // 2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*No space left.*previous checkpoint there is intact"):
        fit(tmp_path, make_module(tiny_policy.path), STEPS, ckpt_path="last", checkpoint_io=FullDisk())
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind
    resumed = make_module(tiny_policy.path)
    fit(tmp_path, resumed, STEPS, ckpt_path="last")
    ref_root, ref_module = reference
    assert max_abs_diff(ref_module.policy, resumed.policy) <= TOLERANCE


# ----------------------------------------------------------------------------- the CLI in a subprocess
def _spiral_fit(config: Path, log: Path, *args: str) -> subprocess.Popen:
    """``python -m spiral_lit fit`` in a subprocess, its output going to ``log`` (a pipe could fill up and block it)."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "spiral_lit", "fit", "--config", str(config), *args]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(run: subprocess.Popen, log: Path) -> str:
    run.wait(timeout=300)
    return log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_sigterm_to_a_cli_run_then_resume(tiny_policy, tmp_path: Path, devices: int) -> None:
    """On 2 processes (DDP over gloo) the SIGTERM reaches rank 0, which passes it on; every rank's RNG states
    and pending sequences go into the checkpoint."""
    ranks = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
    config = cli_config(tiny_policy.path, tmp_path)  # one verifier worker per rank: it must survive the signal
    last = tmp_path / "spiral" / "checkpoints" / "last.ckpt"
    log = tmp_path / "run.log"
    run = _spiral_fit(config, log, *ranks, "--trainer.max_steps", "200")
    deadline = time.monotonic() + 300
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # mid-run: the first checkpoint (every step) has just been written
    output = _finish(run, log)
    assert run.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM at global step" in output
    checkpoint = load_checkpoint_file(last)
    assert 1 <= checkpoint["global_step"] < 200
    assert len(checkpoint["rng_states_per_rank"]) == len(checkpoint["spiral_lit"]["pending_per_rank"]) == devices
    total = checkpoint["global_step"] + 3
    resumed = _spiral_fit(config, log, *ranks, "--trainer.max_steps", str(total), "--ckpt_path", "last")
    output = _finish(resumed, log)
    assert resumed.returncode == 0, output[-3000:]
    assert load_checkpoint_file(last)["global_step"] == total
    assert (tmp_path / "spiral" / "hf" / "model.safetensors").is_file()

    reference = tmp_path / "reference"
    reference.mkdir()
    uninterrupted = _spiral_fit(cli_config(tiny_policy.path, reference), log, *ranks, "--trainer.max_steps", str(total))
    output = _finish(uninterrupted, log)
    assert uninterrupted.returncode == 0, output[-3000:]
    a = load_checkpoint_file(reference / "spiral" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint_file(last)["state_dict"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
    assert scalars(reference / "spiral", "reward") == scalars(tmp_path / "spiral", "reward")
