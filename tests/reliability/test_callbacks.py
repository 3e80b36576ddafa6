"""callbacks.py's writers: ``HFExport`` refuses a location that would destroy the run or the user's files before
training starts; ``guard_outputs`` (the CLI's hook) refuses a fresh fit over an earlier run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tiny_run import fit, make_module

from spiral_lit.errors import UserError
from spiral_lit.reliability.callbacks import HFExport, PredictionWriter, guard_outputs
from spiral_lit.reliability.checkpointing import load_checkpoint_file


class NoTraining(L.Callback):
    def on_train_start(self, *args: Any) -> None:
        raise AssertionError("training started although the output location should have been refused")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_hf_export_refuses_the_run_directory_and_foreign_files_before_training(tiny_policy, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, make_module(tiny_policy.path), max_steps=1, callbacks=[HFExport()])
    assert (run / "tb" / "hf" / "config.json").is_file()
    before, last = _files(run), str(run / "checkpoints" / "last.ckpt")
    for dirpath, message in (
        (run / "tb", r"dirpath '.*tb' is the run's log directory.*overwrite: true. to HFExport does not change"),
        (run, r"dirpath '.*run' contains .*, which is the run's log directory"),
        (run / "checkpoints", r"is the run's checkpoint directory"),
        (tiny_policy.path, r"is the model it trains \(policy\.path\)"),
    ):
        with pytest.raises(UserError, match=message):
            fit(run, make_module(tiny_policy.path), 2, last, [HFExport(str(dirpath), overwrite=True), NoTraining()])
    assert before.items() <= _files(run).items()  # all still there (Lightning adds an empty events file)
    assert load_checkpoint_file(last)["global_step"] == 1

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"dirpath '.*theirs' already holds 1 entry \(notes\.txt\).*overwrite: true"):
        fit(run, make_module(tiny_policy.path), 2, last, [HFExport(str(theirs)), NoTraining()])
    assert (theirs / "notes.txt").read_text() == "keep me"
    fit(run, make_module(tiny_policy.path), 2, last, [HFExport()])  # its own export of the same run: replaced
    assert load_checkpoint_file(last)["global_step"] == 2 and (run / "tb" / "hf" / "config.json").is_file()


def _trainer(root: Path, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(root), name="run", version=""),
        callbacks=[ModelCheckpoint(save_last=True, save_top_k=0), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_fresh_fit_over_an_earlier_runs_checkpoints_needs_overwrite_or_resume(tmp_path: Path) -> None:
    writers = [HFExport(), PredictionWriter()]
    trainer = _trainer(tmp_path, *writers)
    guard_outputs(trainer, "fit", ckpt_path=None, overwrite=False)  # nothing there yet
    earlier = tmp_path / "run" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run")
    with pytest.raises(UserError, match=r"checkpoints' already holds last\.ckpt.*--ckpt_path last.*--overwrite"):
        guard_outputs(trainer, "fit", ckpt_path=None, overwrite=False)
    other_run = tmp_path / "other.ckpt"
    with pytest.raises(UserError, match="already holds last.ckpt"):
        guard_outputs(trainer, "fit", ckpt_path=str(other_run), overwrite=False)
    guard_outputs(trainer, "fit", ckpt_path="last", overwrite=False)  # a resume
    guard_outputs(trainer, "fit", ckpt_path=str(earlier), overwrite=False)
    guard_outputs(trainer, "validate", ckpt_path=None, overwrite=False)  # writes no checkpoints
    assert not any(w.overwrite for w in writers)
    guard_outputs(trainer, "fit", ckpt_path=None, overwrite=True)
    assert all(w.overwrite for w in writers)  # --overwrite reaches every writer
    assert earlier.read_bytes() == b"an earlier run"
