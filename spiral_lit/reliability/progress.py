"""Plain progress lines for logs that are not a terminal (a cluster job's output file).

A progress bar redraws one line in place; written to a file it shows nothing until the stage
ends (Rich) or piles up carriage returns (tqdm). When the output is not a terminal, or no bar is
shown, :class:`ProgressLog` prints one plain line at most every ``every_s`` seconds instead::

    [spiral_lit] fit: step 120/1000 (12%), 1.90 s/step, elapsed 0:03:48, left ~0:27:52

An evaluation batch can run for minutes (100 problems through RSA to 10 rounds), so the modules also report which
scaffold a batch is on (:func:`report_phase`), at the same bounded rate::

    [spiral_lit] validate: batch 1/2: RSA round 6/10, elapsed 0:02:40

The CLI adds it to every Trainer (``--trainer.callbacks+=spiral_lit.reliability.progress.ProgressLog
--trainer.callbacks.every_s 60`` changes the rate). On a terminal with the progress bar on, it prints
nothing. :class:`LogProgress` does the same for a loop outside Lightning.

On a terminal, :class:`StepProgressBar` (also added by the CLI; off when its output is a file) is Lightning's
tqdm bar with its training bar counting optimiser steps out of ``max_steps``, as these lines do: a SPIRAL or GRPO
step whose dynamic sampling refills draws several batches before it updates, and a bar of batches out of
``max_steps`` read ``114/60``.

Lines go through Lightning's rank-zero logger (``rank_zero_info``): on stderr, from process 0 only.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

Clock = Callable[[], float]
Emit = Callable[[str], None]


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _rate(done: int, elapsed: float, unit: str) -> str:
    """``12.50 steps/s`` when fast, ``1.90 s/step`` when slow."""
    per_s = done / elapsed
    plural = unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")
    return f"{per_s:.2f} {plural}/s" if per_s > 1 else f"{elapsed / done:.2f} s/{unit}"


@dataclass
class LoopProgress:
    """One loop's progress: ``unit``s done of ``total`` (``None``: unknown), counted from ``start_done`` at
    ``start_time``, so a resumed run's rate and time left count only this run's work."""

    label: str
    unit: str
    total: int | None
    start_time: float
    start_done: int = 0

    def complete(self, done: int) -> bool:
        """Whether ``done`` reaches the total: the loop's final line follows, so no progress line is needed."""
        return self.total is not None and done >= self.total

    def line(self, done: int, now: float, cap_s: float | None = None, final: bool = False) -> str:
        """``label: unit done/total (pct), rate, elapsed, left``; ``cap_s`` bounds the time left (``max_time``);
        ``final`` marks the loop's last line, which says ``finished`` instead of the time left."""
        elapsed = max(now - self.start_time, 1e-9)
        ran = done - self.start_done
        parts = [f"{self.label}: {self.unit} {done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * done / self.total:.0f}%)"
        if ran > 0:
            parts.append(_rate(ran, elapsed, self.unit))
        parts.append(f"elapsed {format_duration(elapsed)}")
        left = [cap_s] if cap_s is not None else []
        if self.total and ran > 0:
            left.append((self.total - done) * elapsed / ran)
        if final:
            parts.append("finished")
        elif left:
            parts.append(f"left ~{format_duration(min(left))}")
        return "[spiral_lit] " + ", ".join(parts)

    def phase_line(self, done: int, now: float, phase: str) -> str:
        """``label: unit done+1/total: phase, elapsed``: where the unit in progress is (no rate: it is unfinished)."""
        of = f"/{self.total}" if self.total else ""
        elapsed = format_duration(now - self.start_time)
        return f"[spiral_lit] {self.label}: {self.unit} {done + 1}{of}: {phase}, elapsed {elapsed}"


@dataclass
class Throttle:
    """Allows one line every ``every_s`` seconds, counted from :meth:`start`."""

    every_s: float
    clock: Clock
    last: float | None = None

    def start(self) -> None:
        """Start counting (only the first call counts)."""
        if self.last is None:
            self.last = self.clock()

    def ready(self) -> bool:
        """Whether a line may be printed now; if so, the next one waits ``every_s`` from now."""
        self.start()
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return False
        self.last = now
        return True


def _finite_total(batches: list[int | float]) -> int | None:
    total = sum(batches)
    return int(total) if math.isfinite(total) and total > 0 else None


class ProgressLog(L.Callback):
    """Prints a plain progress line for fit, validate, test and predict, at most one every ``every_s`` seconds,
    when the progress bar is not on a terminal (stdout is a file or a pipe, or the bar is off)."""

    def __init__(self, every_s: float = 30.0, clock: Clock | None = None, emit: Emit | None = None) -> None:
        """
        Args:
            every_s: Seconds between two progress lines (the last line of a stage is printed when it ends).
            clock: Monotonic clock in seconds (default ``time.monotonic``; tests pass a fake one).
            emit: Where a line goes (default Lightning's ``rank_zero_info``).
        """
        self.every_s = every_s
        self._clock = clock or time.monotonic
        self._emit = emit or rank_zero_info
        self._throttle = Throttle(every_s, self._clock)
        self._active = False
        self._loops: dict[str, LoopProgress] = {}
        self._done: dict[str, int] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        bar_on_terminal = bar is not None and getattr(bar, "is_enabled", True) and sys.stdout.isatty()
        self._active = not bar_on_terminal

    def _start(self, key: str, label: str, unit: str, total: int | None, done: int = 0) -> None:
        self._loops[key] = LoopProgress(label, unit, total, self._clock(), done)
        self._done[key] = done
        self._throttle.start()

    def _advance(self, key: str, done: int, cap_s: float | None = None) -> None:
        self._done[key] = done
        loop = self._loops.get(key)
        if self._active and loop is not None and not loop.complete(done) and self._throttle.ready():
            self._emit(loop.line(done, self._clock(), cap_s))

    def _finish(self, key: str, nested: bool = False) -> None:
        """The loop's last line; for a validation inside fit only when a line is due, so that validating every
        few steps does not print a line every few steps."""
        loop = self._loops.pop(key, None)
        if not self._active or loop is None or self._done[key] <= loop.start_done:
            return
        if not nested or self._throttle.ready():
            self._emit(loop.line(self._done[key], self._clock(), final=True))

    # ----------------------------------------------------------------------------- fit
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._start("train", "fit", "step", total, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # ``max_time``; Trainer.callbacks is set by Lightning's callback connector, unannotated.
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
        self._advance("train", trainer.global_step, timer.time_remaining() if timer is not None else None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("train")

    # ----------------------------------------------------------------------------- evaluation loops
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._start("eval", "sanity check", "batch", _finite_total(trainer.num_sanity_val_batches))
        else:
            label = "validation" if trainer.state.fn == "fit" else "validate"
            self._start("eval", label, "batch", _finite_total(trainer.num_val_batches))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("eval", "test", "batch", _finite_total(trainer.num_test_batches))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("eval", "predict", "batch", _finite_total(trainer.num_predict_batches))

    def phase(self, label: str) -> None:
        """A progress line inside an evaluation batch, at most one every ``every_s``: which scaffold the batch is
        on (``label``), for batches that run for minutes (RSA to 10 rounds over 100 problems)."""
        loop = self._loops.get("eval")
        if self._active and loop is not None and self._throttle.ready():
            self._emit(loop.phase_line(self._done.get("eval", 0), self._clock(), label))

    def _eval_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance("eval", self._done.get("eval", 0) + 1)

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _eval_batch_end

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("eval", nested=trainer.state.fn == "fit")

    on_validation_end = on_test_end = on_predict_end = _eval_end


class LogProgress:
    """:class:`ProgressLog` for a loop outside Lightning: ``update(done)`` after each item, ``close()`` at the end.

    Prints only when ``enabled`` (default: stderr, where a tqdm bar draws, is not a terminal).
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "item",
        every_s: float = 30.0,
        enabled: bool | None = None,
        clock: Clock | None = None,
        emit: Emit | None = None,
    ) -> None:
        clock = clock or time.monotonic
        self.enabled = not sys.stderr.isatty() if enabled is None else enabled
        self._loop = LoopProgress(label, unit, total, clock())
        self._throttle, self._clock, self._emit = Throttle(every_s, clock), clock, emit or rank_zero_info
        self._throttle.start()
        self._done = 0

    def update(self, done: int) -> None:
        self._done = done
        if self.enabled and not self._loop.complete(done) and self._throttle.ready():
            self._emit(self._loop.line(done, self._clock()))

    def close(self) -> None:
        if self.enabled and self._done > 0:
            self._emit(self._loop.line(self._done, self._clock(), final=True))


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar whose training bar counts optimiser steps (``trainer.global_step``) out of
    ``max_steps``, not batches out of the loader's length (module docstring). Without ``max_steps`` it is
    Lightning's bar unchanged. Off when stderr, where it draws, is not a terminal: in a log file a bar is one
    endless line of redraws, and :class:`ProgressLog` prints plain lines there instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not sys.stderr.isatty():
            self.disable()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.n = trainer.global_step  # a resumed run starts where it stopped
            self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        bar, done = self.train_progress_bar, trainer.global_step
        if bar is not None and done != bar.n and self._should_update(done, bar.total):
            bar.n = done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def report_phase(trainer: L.Trainer | None, label: str) -> None:
    """Hands ``label`` to the Trainer's :class:`ProgressLog` (:meth:`ProgressLog.phase`); nothing without one."""
    # Trainer.callbacks is set by Lightning's callback connector, unannotated.
    for callback in trainer.callbacks if trainer is not None else []:  # type: ignore[attr-defined]
        if isinstance(callback, ProgressLog):
            callback.phase(label)
