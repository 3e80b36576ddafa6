"""Plain progress lines at a bounded rate when the output is not a terminal; none under a terminal's progress bar."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from tiny_run import cli_config

from spiral_lit.cli import main
from spiral_lit.reliability.progress import (
    LogProgress,
    LoopProgress,
    ProgressLog,
    StepProgressBar,
    format_duration,
    report_phase,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trainer(**overrides: Any) -> SimpleNamespace:
    fields = {
        "progress_bar_callback": None,
        "max_steps": 100,
        "global_step": 0,
        "callbacks": [],
        "sanity_checking": False,
        "state": SimpleNamespace(fn="fit"),
        "num_val_batches": [4],
        "num_test_batches": [3],
    }
    return SimpleNamespace(**(fields | overrides))


def _fit(callback: ProgressLog, trainer: SimpleNamespace, clock: FakeClock, steps: int, s_per_step: float) -> None:
    callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    for _ in range(steps):
        clock.now += s_per_step
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
    callback.on_train_end(trainer, None)  # type: ignore[arg-type]


def test_line_format() -> None:
    assert format_duration(3725.2) == "1:02:05"
    loop = LoopProgress("fit", "step", total=1000, start_time=0.0, start_done=100)
    assert loop.line(120, now=38.0) == (
        "[spiral_lit] fit: step 120/1000 (12%), 1.90 s/step, elapsed 0:00:38, left ~0:27:52"
    )
    assert loop.line(120, now=38.0, cap_s=60.0).endswith("left ~0:01:00")  # max_time comes first
    assert loop.line(120, now=38.0, final=True).endswith("elapsed 0:00:38, finished")
    batches = LoopProgress("validate", "batch", total=None, start_time=0.0)
    assert batches.line(30, now=10.0) == "[spiral_lit] validate: batch 30, 3.00 batches/s, elapsed 0:00:10"


def test_fit_prints_at_most_one_line_every_interval() -> None:
    clock, lines = FakeClock(), []
    _fit(ProgressLog(every_s=30, clock=clock, emit=lines.append), _trainer(), clock, steps=100, s_per_step=1.0)
    assert lines == [
        "[spiral_lit] fit: step 30/100 (30%), 1.00 s/step, elapsed 0:00:30, left ~0:01:10",
        "[spiral_lit] fit: step 60/100 (60%), 1.00 s/step, elapsed 0:01:00, left ~0:00:40",
        "[spiral_lit] fit: step 90/100 (90%), 1.00 s/step, elapsed 0:01:30, left ~0:00:10",
        "[spiral_lit] fit: step 100/100 (100%), 1.00 s/step, elapsed 0:01:40, finished",
    ]


def test_fast_steps_resume_and_max_time() -> None:
    clock, lines = FakeClock(), []
    timer = Timer(duration={"seconds": 60})
    timer.time_remaining = lambda *args: 45.0  # type: ignore[method-assign]
    trainer = _trainer(max_steps=10_000, global_step=500, callbacks=[timer])
    _fit(ProgressLog(every_s=30, clock=clock, emit=lines.append), trainer, clock, steps=700, s_per_step=0.125)
    # 700 steps in 87.5 s from step 500: two lines, each counting only this run's steps; time left from max_time
    assert lines[0] == "[spiral_lit] fit: step 740/10000 (7%), 8.00 steps/s, elapsed 0:00:30, left ~0:00:45"
    assert lines[1] == "[spiral_lit] fit: step 980/10000 (10%), 8.00 steps/s, elapsed 0:01:00, left ~0:00:45"
    assert len(lines) == 3 and lines[2].endswith("finished")


def test_validation_batches_share_the_rate_limit() -> None:
    clock, lines = FakeClock(), []
    callback = ProgressLog(every_s=30, clock=clock, emit=lines.append)
    trainer = _trainer(state=SimpleNamespace(fn="validate"))
    callback.setup(trainer, None, "validate")  # type: ignore[arg-type]
    callback.on_validation_start(trainer, None)  # type: ignore[arg-type]
    for batch in range(4):
        clock.now += 20.0
        callback.on_validation_batch_end(trainer, None, None, None, batch)
    callback.on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert lines == [
        "[spiral_lit] validate: batch 2/4 (50%), 20.00 s/batch, elapsed 0:00:40, left ~0:00:40",
        "[spiral_lit] validate: batch 4/4 (100%), 20.00 s/batch, elapsed 0:01:20, finished",
    ]


def test_a_long_evaluation_batch_says_which_scaffold_it_is_on() -> None:
    clock, lines = FakeClock(), []
    callback = ProgressLog(every_s=30, clock=clock, emit=lines.append)
    trainer = _trainer(state=SimpleNamespace(fn="validate"), num_val_batches=[2], callbacks=[callback])
    callback.setup(trainer, None, "validate")  # type: ignore[arg-type]
    callback.on_validation_start(trainer, None)  # type: ignore[arg-type]
    for label in ["8 search traces per problem", "aggregation of a set", *(f"RSA round {t}/10" for t in range(1, 11))]:
        clock.now += 20.0
        report_phase(trainer, label)  # type: ignore[arg-type]
    assert lines == [
        "[spiral_lit] validate: batch 1/2: aggregation of a set, elapsed 0:00:40",
        "[spiral_lit] validate: batch 1/2: RSA round 2/10, elapsed 0:01:20",
        "[spiral_lit] validate: batch 1/2: RSA round 4/10, elapsed 0:02:00",
        "[spiral_lit] validate: batch 1/2: RSA round 6/10, elapsed 0:02:40",
        "[spiral_lit] validate: batch 1/2: RSA round 8/10, elapsed 0:03:20",
        "[spiral_lit] validate: batch 1/2: RSA round 10/10, elapsed 0:04:00",
    ]
    clock.now += 20.0
    callback.on_validation_batch_end(trainer, None, None, None, 0)
    clock.now += 20.0
    report_phase(trainer, "RSA round 1/10")
    assert lines[-1] == "[spiral_lit] validate: batch 2/2: RSA round 1/10, elapsed 0:04:40"
    report_phase(None, "outside a Trainer")  # says nothing, raises nothing


def test_validating_every_step_keeps_the_rate_bounded() -> None:
    clock, times = FakeClock(), []
    callback, trainer = ProgressLog(every_s=30, clock=clock, emit=lambda line: times.append(clock.now)), _trainer()
    callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    for _ in range(100):
        clock.now += 1.0
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
        callback.on_validation_start(trainer, None)  # type: ignore[arg-type]
        for batch in range(4):
            clock.now += 0.25
            callback.on_validation_batch_end(trainer, None, None, None, batch)
        callback.on_validation_end(trainer, None)  # type: ignore[arg-type]
    callback.on_train_end(trainer, None)  # type: ignore[arg-type]
    gaps = [b - a for a, b in zip(times, times[1:-1], strict=False)]  # the last line is fit's summary
    assert len(times) == 200 // 30 + 1 and min(gaps) >= 30  # 200 s of training and validation


@pytest.mark.parametrize(("bar", "tty", "prints"), [(True, True, False), (True, False, True), (False, True, True)])
def test_silent_only_under_a_progress_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, bar: bool, tty: bool, prints: bool
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    clock, lines = FakeClock(), []
    trainer = _trainer(progress_bar_callback=object() if bar else None)
    _fit(ProgressLog(every_s=30, clock=clock, emit=lines.append), trainer, clock, steps=100, s_per_step=1.0)
    assert bool(lines) is prints


def test_loop_outside_lightning() -> None:
    clock, lines = FakeClock(), []
    progress = LogProgress("compare spiral", 200, "problem", enabled=True, clock=clock, emit=lines.append)
    for done in range(50, 201, 50):
        clock.now += 25.0
        progress.update(done)
    progress.close()
    assert lines == [
        "[spiral_lit] compare spiral: problem 100/200 (50%), 2.00 problems/s, elapsed 0:00:50, left ~0:00:50",
        "[spiral_lit] compare spiral: problem 200/200 (100%), 2.00 problems/s, elapsed 0:01:40, finished",
    ]


def test_cli_fit_logs_progress_when_not_on_a_terminal(
    tiny_policy, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # as in a job's log file, also under `pytest -s`
    config = cli_config(tiny_policy.path, tmp_path, verifier_workers=0)
    cli = main(["--config", str(config)], run=False)
    assert sum(isinstance(c, ProgressLog) for c in cli.trainer.callbacks) == 1  # added by the CLI
    main(
        ["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "true",
         "--trainer.callbacks+=spiral_lit.reliability.progress.ProgressLog", "--trainer.callbacks.every_s", "0"]
    )  # fmt: skip
    err = "\n".join(caplog.messages)  # Lightning's rank-zero logger: stderr of process 0
    assert "[spiral_lit] fit: step 1/3 (33%)" in err
    assert "[spiral_lit] fit: step 3/3 (100%)" in err and ", finished" in err
    caplog.clear()
    main(
        ["validate", "--config", str(config), "--trainer.limit_val_batches", "1",
         "--trainer.callbacks+=spiral_lit.reliability.progress.ProgressLog", "--trainer.callbacks.every_s", "0"]
    )  # fmt: skip
    assert "[spiral_lit] validate: batch 1/1: aggregation of a set, elapsed" in caplog.text


class _StepsEveryOtherBatch(BoringModel):
    """Updates on every second batch, as a step that waits for a refill batch does."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.manual_backward(self(batch).sum())
        if batch_idx % 2:
            optimizer = self.optimizers()
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]


@pytest.mark.parametrize("bar_class, shown", [(TQDMProgressBar, 6), (StepProgressBar, 3)])
def test_step_progress_bar_counts_optimiser_steps_not_batches(
    tmp_path: Path, bar_class: type, shown: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # where the bar draws
    bar = bar_class()
    trainer = L.Trainer(
        max_steps=3, callbacks=[bar], logger=False, enable_checkpointing=False, limit_val_batches=0,
        default_root_dir=tmp_path, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_StepsEveryOtherBatch())
    assert trainer.global_step == 3
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (shown, 3)  # Lightning's own: 6 of 3


def test_cli_puts_the_step_bar_on_a_terminal_only(tiny_policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    config = cli_config(tiny_policy.path, tmp_path, verifier_workers=0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cli = main(["--config", str(config), "--trainer.enable_progress_bar", "true"], run=False)
    assert type(cli.trainer.progress_bar_callback) is StepProgressBar and cli.trainer.progress_bar_callback.is_enabled
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log file: the bar is off, ProgressLog prints
    cli = main(["--config", str(config), "--trainer.enable_progress_bar", "true"], run=False)
    assert cli.trainer.progress_bar_callback.is_disabled
    cli = main(["--config", str(config)], run=False)  # enable_progress_bar: false in the config
    assert cli.trainer.progress_bar_callback is None
