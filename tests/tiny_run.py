"""Tiny SPIRAL runs through the Trainer API for the resume, fault and export tests.

A run is the tiny random policy on ``VoteTask`` (pseudo-random but deterministic rewards, so
advantages are non-zero), with the same checkpoint IO and callbacks the CLI adds to every run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from hash_task import VoteTask
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spiral_lit.reliability.callbacks import GracefulStop, ResumeState
from spiral_lit.reliability.checkpointing import AtomicCheckpointIO
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.runtime.policy import VerifierConfig
from spiral_lit.tasks.base import Problem, Split
from spiral_lit.training.data import ProblemDataModule
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
from spiral_lit.training.update import UpdateConfig

ROOT = Path(__file__).resolve().parents[1]


class HalfSignalTask(VoteTask):
    """``VoteTask`` whose odd-numbered problems have an answer no response gets: dynamic sampling drops them,
    so with ``batch_size=2`` every update needs a refill batch and the pending buffer is full between batches."""

    def problem(self, index: int, split: Split) -> Problem:
        problem = super().problem(index, split)
        return dataclasses.replace(problem, answer="never") if index % 2 else problem


def make_module(
    policy_dir: str | Path, task: VoteTask | None = None, cls: type[SpiralModule] = SpiralModule, **overrides: Any
) -> SpiralModule:
    """A SpiralModule (or subclass ``cls``) small enough for a step in well under a second on CPU."""
    kwargs: dict[str, Any] = {
        "policy": PolicyConfig(str(policy_dir)),
        "task": task or VoteTask(n_terms=2, digits=2),
        # No refill: Lightning re-logs an epoch's step metrics at later steps, so at a step that waits for a refill
        # the update's train/* scalars repeat their last values, which a resumed run (fresh metric cache) does not;
        # the resume comparisons here compare every logged step. Refill's own resume test sets it explicitly.
        "algorithm": AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2, max_refill_batches=0),
        "update": UpdateConfig(micro_batch_size=16),
        "search_sampling": SamplingConfig(max_new_tokens=8),
        "aggregation_sampling": SamplingConfig(max_new_tokens=8),
        "verifier": VerifierConfig(num_workers=0),
        "optimizer": lambda params: torch.optim.AdamW(params, lr=1e-2),
        # A warm-up whose position must be restored too.
        "lr_scheduler": lambda optimizer: torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, total_iters=10),
        "log_rollouts_every_n_steps": 1000,
    }
    return cls(**(kwargs | overrides))


class SignalAt(L.Callback):
    """Sends ``signum`` to this process as training batch ``batch`` (counted over all epochs) starts: mid-step."""

    def __init__(self, batch: int, signum: int = signal.SIGTERM) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def fit(
    root: Path,
    module: SpiralModule,
    max_steps: int,
    ckpt_path: str | None = None,
    callbacks: list[L.Callback] | None = None,
    checkpoint_io: Any = None,
) -> L.Trainer:
    """Fit ``module`` to ``max_steps``; checkpoints in ``root/checkpoints`` (last.ckpt), TensorBoard in ``root/tb``."""
    data = ProblemDataModule(module.task, batch_size=2, heldout_size=4, eval_batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(str(root), name="tb", version=""),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[checkpoint_io or AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0),
            ResumeState(seed=0),
            GracefulStop(),
            *(callbacks or []),
        ],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def scalars(root: Path, tag: str) -> dict[int, list[float]]:
    """Every value logged under ``tag``, by step, over all event files of the run."""
    out: dict[int, list[float]] = {}
    for path in sorted(glob.glob(f"{root}/**/events.out.tfevents*", recursive=True)):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                out.setdefault(event.step, []).append(event.value)
    return out


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between two models' parameters."""
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def cli_config(tiny_dir: Path, out: Path, verifier_workers: int = 1) -> Path:
    """The quickstart SPIRAL YAML shrunk to the tiny policy, checkpointing every step; written to ``out``."""
    config = yaml.safe_load((ROOT / "experiments" / "chain_sum" / "spiral.yaml").read_text())
    trainer, model = config["trainer"], config["model"]["init_args"]
    trainer |= {"max_time": None, "val_check_interval": None, "limit_val_batches": 0, "enable_progress_bar": False}
    trainer["logger"]["init_args"]["save_dir"] = str(out)
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    model["policy"]["path"] = str(tiny_dir)
    model["algorithm"] |= {"n_search": 4, "n_sets": 2, "set_size": 2, "n_agg": 2}
    model["search_sampling"]["max_new_tokens"] = model["aggregation_sampling"]["max_new_tokens"] = 8
    model["verifier"] = {"num_workers": verifier_workers}
    model["optimizer"]["init_args"]["lr"] = 1e-2
    config["data"] |= {"batch_size": 2, "heldout_size": 4, "eval_batch_size": 4}
    config["data"]["task"] = {"class_path": "hash_task.VoteTask", "init_args": {"n_terms": 2, "digits": 2}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def edited_policy_copy(tiny_dir: Path, out: Path, file: str, **fields: Any) -> Path:
    """A copy of the tiny policy's directory at ``out`` whose JSON ``file`` has ``fields`` set (a bad or unusual
    checkpoint for one test)."""
    shutil.copytree(tiny_dir, out)
    stored = json.loads((out / file).read_text())
    (out / file).write_text(json.dumps(stored | fields))
    return out
