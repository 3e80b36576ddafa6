"""``python -m spiral_lit {fit,validate,test,predict} --config X.yaml``: LightningCLI; ``python -m spiral_lit
{compare,export,tiny,convert_gguf,cpu_precision} ...``: the tools, each with its own options (``spiral-lit`` is the
same command).

The Trainer subcommands are LightningCLI's own. A tool named first is handed the rest of the command line before
LightningCLI parses anything (:data:`TOOLS`), since it is no Trainer method; the top-level ``--help`` lists the tools
beside the Trainer subcommands, and ``python -m spiral_lit compare --help`` shows the tool's options. The tools'
module entry points (``python -m spiral_lit.evaluation.compare``, ``spiral_lit.tools.export``, ...) still run,
with a ``FutureWarning``, for one release (:func:`run_alias`).

The model is chosen by ``class_path`` (``spiral_lit.WarmStartModule`` or
``spiral_lit.SpiralModule``); the data module is always :class:`ProblemDataModule`.
The task is configured once, under ``data.task``, and linked into the model at
instantiation, so the verifier and the prompts always match the data.

``predict`` answers the problems of ``--data.predict_path`` (JSONL) with
``model.init_args.eval.predict_scaffold`` and writes them with :class:`PredictionWriter`
(``--prediction_writer.output_path``, ``--prediction_writer.include_traces``), which the CLI
adds to every run.

Reliable runs (docs/algorithm.md §8.4): every Trainer gets
:class:`~spiral_lit.reliability.checkpointing.AtomicCheckpointIO` (crash-safe, weights-only checkpoints) and the
:class:`~spiral_lit.reliability.callbacks.ResumeState` and :class:`~spiral_lit.reliability.callbacks.GracefulStop`
callbacks, so ``fit --ckpt_path last`` continues exactly, also after SIGTERM or Ctrl-C. Before any model is
loaded, an explicit ``--ckpt_path`` must exist and belong to the configured model, and token budgets must fit
the model's context (:mod:`spiral_lit.reliability.preflight`).

Bad input gets one message: a ``--config`` file that is missing, empty, not a mapping or not valid YAML is
named (with the line) before parsing; a parser error shows one usage line, not every option; a
:class:`~spiral_lit.errors.UserError` is printed without a traceback by ``python -m spiral_lit``
(:func:`~spiral_lit.errors.run_main`), also by the tools. Every Trainer also gets
:class:`~spiral_lit.reliability.progress.ProgressLog`, which prints a progress line every 30 s when the output is a
log file rather than a terminal, and on a terminal
:class:`~spiral_lit.reliability.progress.StepProgressBar`, whose training bar counts optimiser steps.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from spiral_lit.errors import PathNotFoundError, UserError, run_main
from spiral_lit.reliability.callbacks import GracefulStop, PredictionWriter, ResumeState, guard_outputs
from spiral_lit.reliability.checkpointing import AtomicCheckpointIO, check_resume_config, is_lightning_special_path
from spiral_lit.reliability.preflight import preflight
from spiral_lit.reliability.progress import ProgressLog, StepProgressBar
from spiral_lit.training.data import ProblemDataModule

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

PROG = "python -m spiral_lit"

DESCRIPTION = (
    "SPIRAL on PyTorch Lightning. fit, validate, test and predict run the Trainer on a run YAML (--config); "
    "compare, export, tiny, convert_gguf and cpu_precision are tools with their own options. Add --help after any "
    "subcommand."
)

TOOLS = {
    "compare": ("spiral_lit.evaluation.compare", "Evaluate checkpoints on the same held-out problems and seeds "
                "(trainer.validate); write tables and plots."),
    "export": ("spiral_lit.tools.export", "Write a checkpoint's policy as a Hugging Face directory."),
    "tiny": ("spiral_lit.tools.tiny", "Build the quickstart's tiny Llama and tokenizer locally."),
    "convert_gguf": ("spiral_lit.tools.convert_gguf", "Turn a GGUF checkpoint into a save_pretrained directory."),
    "cpu_precision": ("spiral_lit.tools.cpu_precision", "Print the faster training precision on this CPU "
                      "(bf16-mixed or 32-true), timed on a matmul."),
}  # fmt: skip
"""Subcommands that are no Trainer method: name -> (module whose ``main(argv)`` runs it, one line of help)."""


def _task_of(data: ProblemDataModule):  # noqa: ANN202 - jsonargparse reads the return annotation lazily
    return data.task


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class _Parser(LightningArgumentParser):
    """A parser error shows one usage line above the error, not the usage of every option (a page or two), so the
    message is what the user reads; ``--help`` still lists every option."""

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        subcommands = self._subcommands_action
        first = "{" + ",".join(subcommands.choices) + "} " if subcommands is not None else ""
        self._print_message(f"usage: {self.prog} [-h] {first}[-c CONFIG] [--KEY VALUE ...]\n", file)


class SpiralCLI(LightningCLI):
    """LightningCLI with the data -> model task link, predict's writer, the reliability safeguards
    (docs/algorithm.md §8.4) and the tools listed among the subcommands."""

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's Trainer subcommands, then each tool as an entry of the same list, so ``--help`` and a usage
        error name them too; :func:`main` runs a tool before this parser sees its options."""
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        assert subcommands is not None  # added by Lightning's _add_subcommands
        for name, (_, description) in TOOLS.items():
            tool_parser = self.parser_class(description=f"{description} Options: {PROG} {name} --help.")
            subcommands.add_subcommand(name, tool_parser, help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing without its warning for ``args`` given while ``sys.argv`` holds others: :func:`main`
        always passes the arguments, its own (``sys.argv[1:]``) or a tool's (compare, export build the run from
        theirs)."""
        is_object = isinstance(args, (dict, Namespace))
        self.config = parser.parse_object(args) if is_object else parser.parse_args(args)
        tool = self.config.get("subcommand")
        if tool in TOOLS:
            raise UserError(f"{tool} takes its own options, after its name: {PROG} {tool} --help lists them.")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Let this run write where files it did not create are (a fresh fit into a run directory that holds "
            "checkpoints, an export or prediction file of someone else's); inputs and the run's own directory are "
            "never overwritten.",
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        plugins = _as_list(config.get("plugins"))
        strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)
        if strategy_io is None and not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        given = _as_list(config.get("callbacks")) + callbacks
        for default in (ResumeState, GracefulStop, ProgressLog):
            if not any(isinstance(c, default) for c in given):
                callbacks.append(default())
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(StepProgressBar())
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
        subcommand = self.config["subcommand"]
        preflight(self.model, self.datamodule, self.trainer, subcommand)
        config = self.config[subcommand]
        guard_outputs(self.trainer, subcommand, config.get("ckpt_path"), bool(config.get("overwrite")))

    before_fit = before_validate = before_test = before_predict = _preflight


def _config_values(args: Sequence[str]) -> list[str]:
    """The values of ``-c``/``--config`` in ``args``."""
    values = [arg.partition("=")[2] for arg in args if arg.startswith("--config=")]
    return values + [value for flag, value in zip(args, args[1:], strict=False) if flag in ("-c", "--config")]


def _yaml_error(path: Path, text: str, error: yaml.YAMLError) -> str:
    """Where a YAML syntax error is (line, column, the line itself) and what the parser found there."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"--config '{path}' is not valid YAML: {problem}. Fix the syntax."
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    tab = " (a tab: YAML indents with spaces only)" if "\t" in line[: mark.column + 1] else ""
    return (
        f"--config '{path}', line {mark.line + 1}, column {mark.column + 1}: {problem}{tab}, in {line.strip()!r}. "
        "Fix the YAML syntax there."
    )


def check_config_file(value: str) -> None:
    """Refuse a ``--config`` value that is no readable YAML mapping, naming the file (and the line), before jsonargparse
    turns it into a terse error ("Unexpected config", a scanner trace) under a page of usage."""
    path = Path(value)  # as jsonargparse reads it: no ~ expansion
    if not path.exists():
        try:
            inline = "://" in value or isinstance(yaml.safe_load(value), dict)
        except yaml.YAMLError:
            inline = False
        if inline:
            return  # a URL or an inline YAML mapping (``--config '{trainer: {max_steps: 1}}'``): jsonargparse reads it
        raise PathNotFoundError(f"--config '{value}': no such file (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        raise UserError(f"--config '{value}' is a directory; give a YAML file (experiments/quickstart/spiral.yaml).")
    try:
        text = path.read_text(encoding="utf-8")
        content = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise UserError(f"--config '{path}' is not UTF-8 text (byte {error.start}); save it as UTF-8.") from error
    except yaml.YAMLError as error:
        raise UserError(_yaml_error(path, text, error)) from error
    expected = "expected a YAML mapping of sections (trainer:, model:, data:), as in experiments/quickstart/spiral.yaml"
    if content is None:
        raise UserError(f"--config '{path}' is empty (or holds only comments): {expected}.")
    if not isinstance(content, dict):
        kind = "list" if isinstance(content, list) else f"single value ({str(content)[:40]!r})"
        raise UserError(f"--config '{path}' holds a YAML {kind}: {expected}.")


def main(args: list[str] | None = None, run: bool = True) -> Any:
    """Run ``args`` (default: ``sys.argv[1:]``): a tool named first gets the rest and its result is returned;
    otherwise LightningCLI parses them and the :class:`SpiralCLI` is returned (with ``run=False``, and no
    subcommand, it only builds the objects).

    Raises :class:`~spiral_lit.errors.UserError` for bad input; ``python -m spiral_lit`` prints it without a traceback.
    """
    args = sys.argv[1:] if args is None else list(args)
    if run and args and args[0] in TOOLS:
        return importlib.import_module(TOOLS[args[0]][0]).main(args[1:])
    for value in _config_values(args):
        check_config_file(value)
    # Lightning 2.6 warns on every periodic save under manual optimisation that the checkpoint holds the state
    # after the optimiser step: exactly the step boundary that an exact resume needs (docs/algorithm.md §8.4).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    return SpiralCLI(
        L.LightningModule,
        ProblemDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_class=_Parser,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        args=args,
        run=run,
    )


def console_main() -> None:
    """The ``spiral-lit`` command (pyproject ``[project.scripts]``) and ``python -m spiral_lit``: :func:`main`, with
    bad input printed without a traceback (exit status 2). Returns nothing, so the exit status is 0 on success."""
    run_main(main)


def run_alias(tool: str, spec: Any) -> None:
    """``python -m <module>`` of a tool (``spec``: the ``__spec__`` it runs under): a ``FutureWarning`` naming the
    new spelling, then the tool as ``python -m spiral_lit <tool>`` runs it."""
    old = getattr(spec, "name", None) or TOOLS[tool][0]
    warnings.warn(
        f"python -m {old} is now `{PROG} {tool}` (same options); the old spelling goes in the next release",
        FutureWarning,
        stacklevel=2,
    )
    run_main(lambda: main([tool, *sys.argv[1:]]))
