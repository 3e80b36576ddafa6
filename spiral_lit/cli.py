"""``python -m spiral_lit {fit,validate,test,predict} --config X.yaml``: LightningCLI.

The model is chosen by ``class_path`` (``spiral_lit.WarmStartModule`` or
``spiral_lit.SpiralModule``); the data module is always :class:`ProblemDataModule`.
The task is configured once, under ``data.task``, and linked into the model at
instantiation, so the verifier and the prompts always match the data.

``predict`` answers the problems of ``--data.predict_path`` (JSONL) with
``model.init_args.eval.predict_scaffold`` and writes them with :class:`PredictionWriter`
(``--prediction_writer.output_path``, ``--prediction_writer.include_traces``), which the CLI
adds to every run.

Reliable runs (issue 7): every Trainer gets :class:`~spiral_lit.checkpointing.AtomicCheckpointIO`
(crash-safe, weights-only checkpoints) and the :class:`~spiral_lit.callbacks.ResumeState` and
:class:`~spiral_lit.callbacks.GracefulStop` callbacks, so ``fit --ckpt_path last`` continues exactly,
also after SIGTERM or Ctrl-C. Before any model is loaded, an explicit ``--ckpt_path`` must exist and
belong to the configured model, and token budgets must fit the model's context
(:mod:`spiral_lit.preflight`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from spiral_lit.callbacks import GracefulStop, PredictionWriter, ResumeState
from spiral_lit.checkpointing import AtomicCheckpointIO, check_resume_config, is_lightning_special_path
from spiral_lit.data import ProblemDataModule
from spiral_lit.preflight import preflight


def _task_of(data: ProblemDataModule):  # noqa: ANN202 - jsonargparse reads the return annotation lazily
    return data.task


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class SpiralCLI(LightningCLI):
    """LightningCLI with the data -> model task link, predict's writer and the issue-7 safeguards."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        plugins = _as_list(config.get("plugins"))
        strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)
        if strategy_io is None and not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        given = _as_list(config.get("callbacks")) + callbacks
        for default in (ResumeState, GracefulStop):
            if not any(isinstance(c, default) for c in given):
                callbacks.append(default())
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path`` before anything is built: it exists, loads, and was written by the
        configured model class on the configured policy; then Lightning merges its hyperparameters."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        # A directory is a sharded checkpoint, loaded by its strategy; weights_only=false is the user's call.
        explicit_file = ckpt_path and not is_lightning_special_path(str(ckpt_path)) and not Path(ckpt_path).is_dir()
        if explicit_file and self.config[subcommand].get("weights_only") is not False:
            model = self.config[subcommand].get("model")
            policy = model.get("init_args", {}).get("policy") if model is not None else None
            hparams = check_resume_config(
                str(ckpt_path),
                model.get("class_path") if model is not None else None,
                policy.get("path") if policy is not None else None,
            )
            if "_class_path" not in hparams:
                return  # not written through this CLI: nothing to merge (its config dataclasses are not dicts)
        super()._parse_ckpt_path()

    def _preflight(self) -> None:
        preflight(self.model, self.datamodule)

    before_fit = before_validate = before_test = before_predict = _preflight


def main(args: list[str] | None = None, run: bool = True) -> SpiralCLI:
    """Parse ``args`` (default: ``sys.argv``); with ``run=False`` (no subcommand) only build the objects."""
    # Lightning 2.6 warns on every periodic save under manual optimisation that the checkpoint holds the state
    # after the optimiser step: exactly the step boundary that an exact resume needs (issue 7).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    return SpiralCLI(
        L.LightningModule,
        ProblemDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
