"""Callbacks that every run uses: Hugging Face export of the policy; predict's JSONL writer."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only


def export_policy(module: L.LightningModule, out_dir: str | Path) -> Path:
    """Write the policy and tokenizer with ``save_pretrained`` into ``out_dir`` atomically.

    Written to a sibling temporary directory first and renamed, so a crash never leaves a
    half-written model where the next stage will look for one.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.policy.save_pretrained(tmp)
    module.runtime.tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


class HFExport(L.Callback):
    """At the end of ``fit``, export the policy as a Hugging Face directory the next stage loads."""

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Output directory; default ``<log_dir>/hf``.
        """
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.dirpath or os.path.join(trainer.log_dir or ".", "hf")
        path = export_policy(pl_module, out)
        print(f"[spiral_lit] exported the policy to {path}")


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s answers as JSON lines, one per problem, as each batch finishes.

    A line holds ``id``, ``question``, ``answer`` (the scaffold's final answer, null if none was
    found), ``correct`` (only when the input row had a reference ``answer``) and, with
    ``include_traces``, the search ``traces`` and RSA's ``aggregations`` (one list per round).
    The CLI adds this callback to every run (``--prediction_writer.*``); it only acts in predict.
    """

    def __init__(self, output_path: str | None = None, include_traces: bool = False) -> None:
        """
        Args:
            output_path: The JSONL file; default ``<log_dir>/predictions.jsonl``. Under DDP rank r > 0
                writes ``<stem>.rank<r>.jsonl`` beside it (each rank answers its own share of the problems).
            include_traces: Also write the generated traces (and aggregations) of every problem.
        """
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.include_traces = include_traces
        self._file: IO[str] | None = None

    def path(self, trainer: L.Trainer) -> Path:
        out = Path(self.output_path or os.path.join(trainer.log_dir or ".", "predictions.jsonl"))
        return out if trainer.global_rank == 0 else out.with_name(f"{out.stem}.rank{trainer.global_rank}.jsonl")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

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
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"[spiral_lit] wrote predictions to {self.path(trainer)}")
