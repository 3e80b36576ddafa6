"""Callbacks that every run uses: exact resume and a clean stop on SIGTERM/SIGINT (docs/algorithm.md §8.4), Hugging Face
export of the policy, predict's JSONL writer.

The CLI adds :class:`ResumeState` and :class:`GracefulStop` to every run (with
:class:`~spiral_lit.reliability.checkpointing.AtomicCheckpointIO`); a script that builds its own ``Trainer`` adds them
itself.
The writers (:class:`HFExport`, :class:`PredictionWriter`) check their output location when the run is set up,
before training or prediction, and write aside and rename (:mod:`spiral_lit.reliability.output_paths`);
:func:`guard_outputs`
is the CLI's check of the run's own checkpoint directory.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spiral_lit.errors import UserError
from spiral_lit.reliability.checkpointing import (
    gather_per_rank,
    is_lightning_special_path,
    own_rank_entry,
    reseed_global_rngs,
    rng_states,
    set_rng_states,
)
from spiral_lit.reliability.output_paths import (
    atomic_dir,
    check_output,
    checkpoint_dirs,
    commit_file,
    partial_file,
    run_directories,
)

if TYPE_CHECKING:
    from spiral_lit.runtime.policy import PolicyRuntime


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def export_policy(
    module: L.LightningModule,
    out_dir: str | Path,
    merge_lora: bool = False,
    overwrite: bool = False,
    what: str = "the export directory",
    flag: str = "overwrite=True",
    protected: Sequence[tuple[str, str | Path | None]] = (),
) -> Path:
    """Write the policy, its tokenizer and chat template with ``save_pretrained`` into ``out_dir`` atomically.

    A LoRA policy (a ``peft.PeftModel``) is written as its adapter (``adapter_config.json`` naming the base
    model), or, with ``merge_lora``, merged into a copy of the base weights as a plain model; ``merge_lora``
    is ignored for a policy without an adapter. Written to a sibling temporary directory first and renamed,
    so a crash never leaves a half-written model where the next stage will look for one. ``out_dir`` may hold
    only an earlier export of ours unless ``overwrite`` (``what``, ``flag`` and ``protected`` go to
    :func:`~spiral_lit.reliability.output_paths.check_output`).
    """
    policy: Any = module.policy  # a transformers PreTrainedModel or a peft.PeftModel: both save_pretrained
    if merge_lora and _is_peft(policy):
        policy = copy.deepcopy(policy).merge_and_unload()  # a copy: the module keeps training its adapter
    with atomic_dir(out_dir, what=what, flag=flag, overwrite=overwrite, protected=protected) as tmp:
        policy.save_pretrained(tmp)
        cast("PolicyRuntime", module.runtime).tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _raise_on_every_rank(trainer: L.Trainer, error: UserError | None) -> None:
    """Raise on every rank if any rank refused its output location (a lone raise would leave the others waiting)."""
    if trainer.strategy.reduce_boolean_decision(error is None, all=True):
        return
    raise error or UserError("another process refused its output location; its message says why")


def _continues_in(directory: Path, ckpt_path: str | None) -> bool:
    """Whether fit resumes from ``ckpt_path`` into ``directory`` (``last``, ``hpc``... resolve to the run's own)."""
    if ckpt_path is None:
        return False
    return is_lightning_special_path(ckpt_path) or directory.resolve() in Path(ckpt_path).resolve().parents


def guard_outputs(trainer: L.Trainer, subcommand: str, ckpt_path: str | None, overwrite: bool) -> None:
    """The CLI's check before a run starts: ``--overwrite`` reaches every writer callback, and a fresh ``fit``
    refuses a checkpoint directory that holds an earlier run's checkpoints (it would replace that run's config and
    export and mix the two runs' checkpoints and logs).

    Continuing a run (``--ckpt_path last``, or a checkpoint inside that directory) writes there as intended.
    """
    if overwrite:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
            if isinstance(callback, (HFExport, PredictionWriter)):
                callback.overwrite = True
    if subcommand != "fit" or overwrite:
        return
    for directory in checkpoint_dirs(trainer):
        found = sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []
        if not found or _continues_in(directory, ckpt_path):
            continue
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(
            f"checkpoint directory {str(directory)!r} already holds {shown} from an earlier run; a fresh fit there "
            "would replace that run's config.yaml and export and mix its checkpoints and logs with this one's. "
            "Continue that run with `--ckpt_path last`, give this run its own directory "
            "(--trainer.logger.init_args.name or .version, or ModelCheckpoint's dirpath), or start over in place "
            "with `--overwrite` (Lightning keeps the earlier checkpoints and numbers the new ones, e.g. last-v1.ckpt)"
        )


class HFExport(L.Callback):
    """At the end of ``fit``, export the policy as a Hugging Face directory the next stage loads.

    The location is checked when fit is set up, before training: it must not be (or contain) the run's log or
    checkpoint directory or the model it trains, and may hold only an earlier export of ours unless
    ``overwrite``. From any checkpoint instead: ``python -m spiral_lit export --config X.yaml --ckpt_path CKPT
    --out DIR``.
    """

    WHAT, FLAG = "HFExport's dirpath", "`overwrite: true` to HFExport"

    def __init__(self, dirpath: str | None = None, merge_lora: bool = False, overwrite: bool = False) -> None:
        """
        Args:
            dirpath: Output directory; default ``<log_dir>/hf``.
            merge_lora: Merge a LoRA adapter into the base weights (a plain model); otherwise the adapter is
                written on its own. Ignored without an adapter.
            overwrite: Replace what ``dirpath`` holds even if spiral_lit did not write it.
        """
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.overwrite = overwrite
        self._protected: list[tuple[str, str | Path | None]] = []

    def _out(self, trainer: L.Trainer) -> str:
        # trainer.log_dir is a broadcast under DDP: every rank must ask for it.
        return self.dirpath or os.path.join(trainer.log_dir or ".", "hf")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        out, protected = self._out(trainer), run_directories(trainer)
        policy_path = getattr(getattr(pl_module, "policy_config", None), "path", None)
        if policy_path is not None and Path(policy_path).expanduser().exists():  # a hub id is not a local input
            protected.append(("the model it trains (policy.path)", policy_path))
        self._protected = protected
        error = None
        if trainer.is_global_zero:  # only rank 0 writes
            try:
                check_output(out, what=self.WHAT, flag=self.FLAG, overwrite=self.overwrite, protected=protected)
            except UserError as refused:
                error = refused
        _raise_on_every_rank(trainer, error)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self._out(trainer)
        if trainer.is_global_zero:
            path = export_policy(pl_module, out, self.merge_lora, self.overwrite, self.WHAT, self.FLAG, self._protected)
            print(f"[spiral_lit] exported the policy to {path}")
        trainer.strategy.barrier("spiral_lit.hf_export")


class ResumeState(L.Callback):
    """Makes ``fit --ckpt_path`` continue as if the run had never stopped (docs/algorithm.md §8.4).

    Checkpoints hold the torch, CUDA, Python and NumPy RNG states of every rank, restored on load.
    On its own that is not enough: between a checkpoint and the next step an uninterrupted run may draw
    from the global RNGs (a DataLoader iterator draws its base seed, validation may run) where a resumed
    one does not. So each training batch also seeds the global RNGs from (seed, batch index, rank), and
    whatever draws from them inside a step (dropout, LoRA dropout) draws the same numbers in both runs.
    spiral_lit's own sampling never uses the global RNGs (every draw has an explicit seed).
    """

    def __init__(self, seed: int | None = None) -> None:
        """
        Args:
            seed: Base of the per-batch seeds; default the run's ``seed_everything`` value (0 without one).
        """
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # total_batch_idx counts batches over all epochs and is part of the checkpointed loop state.
        reseed_global_rngs(self.seed, trainer.fit_loop.total_batch_idx, trainer.global_rank)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states_per_rank"] = gather_per_rank(rng_states(), trainer.world_size)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank:
            states = own_rank_entry(per_rank, trainer.global_rank, trainer.world_size, "RNG states")
            if states is not None:
                set_rng_states(states)


class GracefulStop(L.Callback):
    """SIGTERM or SIGINT (Ctrl-C) stop training at the end of the current step with a resumable checkpoint.

    Lightning stops its loop after a step when ``trainer.received_sigterm`` is set, raising ``SIGTERMException``
    on every rank. Its own SIGTERM handler sets that flag on the signalled rank at once and, under DDP,
    broadcasts from inside the handler: a collective at an arbitrary point of the step, which can deadlock
    against the step's own collectives, and a rank that stops while the others go on. So during training this
    callback handles both signals itself: a handler only records the signal; at the end of every step the ranks
    agree (one all-reduce of a scalar) whether any was signalled, and only then is Lightning's flag set, on every
    rank at the same point, so Lightning ends the run right after this step's logging. On that exception
    ``last.ckpt`` is saved into the run's ``ModelCheckpoint`` directory, where ``--ckpt_path last`` finds it,
    and the process exits with status 128 + the signal number. A second Ctrl-C aborts at once. Other
    exceptions save nothing: they may strike mid-step, and ``last.ckpt`` must only ever hold a step boundary.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Where ``last.ckpt`` goes when the run has no ``ModelCheckpoint``; default
                ``<default_root_dir>/checkpoints``.
        """
        self.dirpath = dirpath
        self._received: int | None = None
        self._stopped_by: int | None = None
        self._previous: dict[int, Any] = {}

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        return os.path.join(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), "last.ckpt")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now
        if self._received is None:
            self._received = signum  # no printing here: the signal may have interrupted a write to stdout

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = self._stopped_by = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Every rank passes here once per step: agree on whether any rank was signalled.
        received = torch.tensor(float(self._received or 0), device=pl_module.device)
        signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if signum and self._stopped_by is None:
            self._stopped_by = signum
            trainer._signal_connector.received_sigterm = True  # Lightning ends the loop after this step
            rank_zero_info(f"[spiral_lit] {signal.Signals(signum).name}: stopping after this step with a checkpoint")

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException):
            return
        stopped_by = signal.Signals(self._stopped_by or signal.SIGTERM)
        path = self.checkpoint_path(trainer)
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            # Recorded in the checkpoint, so the resumed run's ModelCheckpoint overwrites this file (not last-v1).
            trainer.checkpoint_callback.last_model_path = path
        trainer.save_checkpoint(path)  # every rank calls it, as Lightning requires; rank 0 writes
        rank_zero_info(
            f"[spiral_lit] {stopped_by.name} at global step {trainer.global_step}: saved {path}; continue with the "
            "same command and `--ckpt_path last`"
        )
        exception.code = 128 + int(stopped_by)  # the exit status a shell expects of a process stopped by a signal


def _predict_inputs(trainer: L.Trainer) -> set[str]:
    """The files predict reads its problems from: the datamodule's ``predict_path`` if it keeps one, and
    ``data.predict_path`` of the command line's config (which LightningCLI's ``SaveConfigCallback`` holds)."""
    # Trainer.datamodule and Trainer.callbacks are set by Lightning's connectors, unannotated.
    found = {getattr(trainer.datamodule, "predict_path", None)}  # type: ignore[attr-defined]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, SaveConfigCallback):
            data = callback.config.get("data")
            found.add(data.get("predict_path") if hasattr(data, "get") else None)
    return {str(path) for path in found if path}


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s answers as JSON lines, one per problem, as each batch finishes.

    A line holds ``id``, ``question``, ``answer`` (the scaffold's final answer, null if none was
    found), ``correct`` (only when the input row had a reference ``answer``) and, with
    ``include_traces``, the search ``traces`` and RSA's ``aggregations`` (one list per round).
    The CLI adds this callback to every run (``--prediction_writer.*``); it only acts in predict.
    The lines go to a hidden file beside the output, moved into place when predict ends; the output
    is checked at setup, before the model loads, and is never the predict input (``data.predict_path``).
    """

    FLAG = "--prediction_writer.overwrite true"

    def __init__(self, output_path: str | None = None, include_traces: bool = False, overwrite: bool = False) -> None:
        """
        Args:
            output_path: The JSONL file; default ``<log_dir>/predictions.jsonl``. Under DDP rank r > 0
                writes ``<stem>.rank<r>.jsonl`` beside it (each rank answers its own share of the problems).
            include_traces: Also write the generated traces (and aggregations) of every problem.
            overwrite: Replace the output file even if spiral_lit did not write it (never the predict input).
        """
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.include_traces = include_traces
        self.overwrite = overwrite
        self._file: IO[str] | None = None
        self._partial: Path | None = None

    def path(self, trainer: L.Trainer) -> Path:
        out = Path(self.output_path or os.path.join(trainer.log_dir or ".", "predictions.jsonl"))
        return out if trainer.global_rank == 0 else out.with_name(f"{out.stem}.rank{trainer.global_rank}.jsonl")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = self.path(trainer)
        protected = [("the predict input (data.predict_path)", source) for source in _predict_inputs(trainer)]
        error = None
        try:
            check_output(
                path, what="--prediction_writer.output_path", flag=self.FLAG, overwrite=self.overwrite, is_dir=False,
                protected=protected,
            )  # fmt: skip
        except UserError as refused:
            error = refused
        _raise_on_every_rank(trainer, error)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = partial_file(path)
        self._file = self._partial.open("w")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self._file is not None
        for record in prediction:
            if not self.include_traces:
                record = {k: v for k, v in record.items() if k not in ("traces", "aggregations")}
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None and self._partial is not None:
            self._file.close()
            path = commit_file(self._partial, self.path(trainer))
            self._file = self._partial = None
            print(f"[spiral_lit] wrote predictions to {path}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)  # the previous output, if any, is untouched
        self._file = self._partial = None
