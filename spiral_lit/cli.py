"""``python -m spiral_lit {fit,validate,test,predict} --config X.yaml``: LightningCLI.

The model is chosen by ``class_path`` (``spiral_lit.WarmStartModule`` or
``spiral_lit.SpiralModule``); the data module is always :class:`ProblemDataModule`.
The task is configured once, under ``data.task``, and linked into the model at
instantiation, so the verifier and the prompts always match the data.

``predict`` answers the problems of ``--data.predict_path`` (JSONL) with
``model.init_args.eval.predict_scaffold`` and writes them with :class:`PredictionWriter`
(``--prediction_writer.output_path``, ``--prediction_writer.include_traces``), which the CLI
adds to every run.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from spiral_lit.callbacks import PredictionWriter
from spiral_lit.data import ProblemDataModule


def _task_of(data: ProblemDataModule):  # noqa: ANN202 - jsonargparse reads the return annotation lazily
    return data.task


class SpiralCLI(LightningCLI):
    """LightningCLI with the data -> model task link and predict's writer."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")


def main(args: list[str] | None = None, run: bool = True) -> SpiralCLI:
    """Parse ``args`` (default: ``sys.argv``); with ``run=False`` (no subcommand) only build the objects."""
    return SpiralCLI(
        L.LightningModule,
        ProblemDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
