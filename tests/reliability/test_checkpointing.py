"""checkpointing.py: atomic writes, weights-only loads with errors that name the file, mismatch reports,
per-rank RNG states and the pending-sequence serialisation (docs/algorithm.md §8.4)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spiral_lit.reliability.checkpointing import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointWriteError,
    check_resume_config,
    load_checkpoint_file,
    reseed_global_rngs,
    rng_states,
    set_rng_states,
    state_dict_mismatch,
)
from spiral_lit.rollout.base import Completion
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.training.experience import sequences_from_state, sequences_state
from spiral_lit.training.spiral_module import AlgorithmConfig
from spiral_lit.training.update import TrainSequence

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"policy.w": torch.full((3, 2), value)}, "global_step": int(value)}


def test_save_is_atomic_and_leaves_only_the_target(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    io.save_checkpoint(_checkpoint(2.0), path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 2


@pytest.mark.parametrize("had_previous", [True, False])
def test_failed_write_names_the_file_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, had_previous: bool
) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    if had_previous:
        io.save_checkpoint(_checkpoint(1.0), path)

    def disk_full(obj, f) -> None:  # noqa: ANN001
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    expected = "previous checkpoint there is intact" if had_previous else "no file was created there"
    with pytest.raises(CheckpointWriteError, match=rf"last\.ckpt.*No space left on device.*{expected}"):
        io.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["last.ckpt"] if had_previous else [])
    if had_previous:
        assert io.load_checkpoint(path)["global_step"] == 1


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_readable(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from spiral_lit.reliability.checkpointing import AtomicCheckpointIO
        real_save = torch.save
        def save_then_die(obj, f):
            real_save(obj, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # power cut after the data, before the rename
        torch.save = save_then_die
        AtomicCheckpointIO().save_checkpoint({{"global_step": 2}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == -9
    assert load_checkpoint_file(path)["global_step"] == 1
    AtomicCheckpointIO().save_checkpoint(_checkpoint(3.0), path)  # the next save replaces the leftover partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope\.ckpt' does not exist.*--ckpt_path last"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    torch.save(_checkpoint(1.0), tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=r"'.*torn\.ckpt' is not a readable PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "torn.ckpt")
    with pytest.raises(CheckpointReadError, match="is a directory"):
        load_checkpoint_file(tmp_path)


class _RunsACommand:
    """Unpickling this would run a shell command: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _RunsACommand(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointReadError, match=r"evil\.ckpt.*system.*weights-only load refuses"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_spiral_lit_config_dataclasses_load_weights_only(tiny_policy, tmp_path: Path) -> None:
    # A module built in Python (not through the CLI) keeps its config dataclasses in its hyperparameters.
    hparams = {"policy": PolicyConfig(str(tiny_policy.path)), "algorithm": AlgorithmConfig(n_sets=3), "p": tmp_path}
    torch.save({"hyper_parameters": hparams}, tmp_path / "h.ckpt")
    assert load_checkpoint_file(tmp_path / "h.ckpt")["hyper_parameters"] == hparams


def test_state_dict_mismatch_lists_missing_unexpected_and_shapes() -> None:
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    saved = {"a": torch.zeros(2), "b": torch.zeros(3, 5), "d": torch.zeros(1)}
    problems = state_dict_mismatch(saved, expected)
    assert problems == [
        "1 of the model's weights are not in it (e.g. ['c'])",
        "1 of its weights are not in the model (e.g. ['d'])",
        "1 weights differ in shape (b: checkpoint (3, 5) vs model (3, 4))",
    ]
    assert state_dict_mismatch(saved, expected, strict=False) == problems[2:]
    assert state_dict_mismatch(expected, expected) == []


def test_resume_config_check_names_class_and_policy(tmp_path: Path) -> None:
    hparams = {"_class_path": "spiral_lit.SpiralModule", "policy": {"path": "/models/a"}}
    torch.save({"hyper_parameters": hparams}, tmp_path / "c.ckpt")
    assert check_resume_config(str(tmp_path / "c.ckpt"), "spiral_lit.SpiralModule", "/models/a") == hparams
    with pytest.raises(CheckpointMismatchError, match="written by model class spiral_lit.SpiralModule.*WarmStart"):
        check_resume_config(str(tmp_path / "c.ckpt"), "spiral_lit.WarmStartModule", "/models/a")
    with pytest.raises(CheckpointMismatchError, match=r"policy.path='/models/a', but the config gives '/models/b'"):
        check_resume_config(str(tmp_path / "c.ckpt"), "spiral_lit.SpiralModule", "/models/b")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_states(load_checkpoint_file(tmp_path / "rng.pt"))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_reseed_depends_only_on_its_parts() -> None:
    reseed_global_rngs(0, 5, 0)
    a = (torch.rand(2), random.random(), np.random.rand())
    torch.rand(10)  # whatever happened in between
    reseed_global_rngs(0, 5, 0)
    b = (torch.rand(2), random.random(), np.random.rand())
    reseed_global_rngs(0, 5, 1)  # another rank
    c = torch.rand(2)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(a[0], c)


def test_pending_sequences_round_trip(tmp_path: Path) -> None:
    sequences = [
        TrainSequence([1, 2, 3], Completion([4, 5], torch.tensor([-0.5, -1.25]), "stop", "45"), 0.75, 0),
        TrainSequence([1], Completion([6], torch.tensor([-2.0]), "length", "6"), -0.25, 1),
    ]
    torch.save(sequences_state(sequences), tmp_path / "p.pt")
    restored = sequences_from_state(load_checkpoint_file(tmp_path / "p.pt"))
    for a, b in zip(sequences, restored, strict=True):
        assert (a.prompt_ids, a.completion.token_ids, a.completion.text) == (b.prompt_ids, b.completion.token_ids,
                                                                             b.completion.text)  # fmt: skip
        assert (a.advantage, a.role, a.completion.finish_reason) == (b.advantage, b.role, b.completion.finish_reason)
        assert torch.equal(a.completion.logprobs, b.completion.logprobs)
