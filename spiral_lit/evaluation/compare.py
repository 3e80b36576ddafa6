"""Compare checkpoints on the same held-out problems and seeds (docs/algorithm.md §7.6).

    python -m spiral_lit compare --config experiments/quickstart/compare.yaml --out runs/quickstart/compare \\
        --checkpoints warmstart=runs/quickstart/warmstart/hf spiral=runs/quickstart/spiral/hf

``--config`` is any run YAML of ``python -m spiral_lit``: its task, held-out split, prompts,
sampling and ``eval`` section (which scaffolds are measured) are read through the project's
CLI parser. Each checkpoint is ``name=path``: a Hugging Face directory (``save_pretrained``,
e.g. a run's ``hf/`` export), or a Lightning ``.ckpt`` whose policy weights are loaded over the
config's ``model.init_args.policy.path`` (which then gives the architecture and tokenizer).
Seeds derive from ``eval.seed`` and each problem's uid, so every checkpoint sees the same
problems and draws. Each checkpoint is evaluated by ``trainer.validate`` on the config's Trainer, in one process
(``devices: 1``, the default strategy, every held-out batch), so the numbers are those
``python -m spiral_lit validate`` logs with the same config, without a logger. Options after ``--`` override the
config for every checkpoint, as on ``fit``'s command line (``-- --model.init_args.eval.rsa_rounds 10``); the
checkpoint's own path and the one-process Trainer settings still win.

Writes into ``--out``: ``metrics.csv``/``.json`` (each metric's mean per checkpoint),
``curves.csv``/``.json`` (accuracy, generated and prompt tokens per scaffold and x: token
budget, k or RSA round), ``accuracy_vs_tokens.png``, ``pass_at_k.png``, ``rsa_rounds.png``, and
the same figures in TensorBoard (``tensorboard --logdir OUT``), ``intervals.csv``/``.json``: for every pair of
checkpoints (each against every one listed before it) and every metric with one value per problem, the mean
difference with a paired bootstrap 95% interval over the held-out problems
(:func:`~spiral_lit.evaluation.metrics.paired_bootstrap_interval`; columns checkpoint, baseline, metric,
n_problems, difference, low, high; only the header with one checkpoint), and ``per_problem.csv`` (checkpoint,
metric, problem uid, value: what the intervals are computed from, for any other test). Plotting needs matplotlib
(``pip install -e ".[plots]"``).

Before anything is evaluated, every checkpoint is checked against its model (a directory must be a Hugging
Face model directory; a ``.ckpt``'s policy weights must fit the config's model) and ``--out`` is checked
(:mod:`spiral_lit.reliability.output_paths`: new, empty or an earlier compare output, else ``--overwrite``; never a
checkpoint or the config). The results are written beside ``--out`` and renamed into place.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import SaveConfigCallback
from torch.utils.tensorboard import SummaryWriter

from spiral_lit.cli import PROG, SpiralCLI, run_alias
from spiral_lit.cli import main as cli_main
from spiral_lit.errors import PathNotFoundError, UserError
from spiral_lit.evaluation.metrics import paired_bootstrap_interval
from spiral_lit.evaluation.plots import FIGURES, curve_rows
from spiral_lit.reliability.checkpointing import checkpoint_policy_path, load_checkpoint_file, state_dict_mismatch
from spiral_lit.reliability.output_paths import atomic_dir, check_output
from spiral_lit.tasks.base import Problem

OUT: dict[str, Any] = {"what": "--out", "flag": "--overwrite"}


def parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    """``["name=path", ...]`` -> ``{name: path}``; the path must be a directory or a ``.ckpt`` file."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--checkpoints entry {spec!r}: expected name=path, e.g. spiral=runs/quickstart/spiral/hf")
        if name in out:
            raise ValueError(f"--checkpoints entry {spec!r}: the name {name!r} is used twice")
        checkpoint = Path(path)
        if not (checkpoint.is_dir() or (checkpoint.is_file() and checkpoint.suffix == ".ckpt")):
            raise PathNotFoundError(
                f"--checkpoints entry {spec!r}: {path} is neither a Hugging Face directory nor a Lightning .ckpt file"
            )
        out[name] = checkpoint
    if not out:
        raise ValueError("--checkpoints: give at least one name=path")
    return out


ONE_PROCESS = ["--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto"]
"""compare writes its results from one process: the config's accelerator, one device, no sharding."""


def _build(
    config: str, policy_dir: Path | None = None, heldout_size: int | None = None, overrides: Sequence[str] = ()
) -> SpiralCLI:
    """The config's module (its policy from ``policy_dir`` if given), data and Trainer (no logger, one process,
    every held-out batch), with ``overrides`` (command-line options) applied over the config first."""
    args = ["--config", config, *overrides, "--trainer.logger", "false", *ONE_PROCESS]
    args += ["--trainer.limit_val_batches", "null"]
    if policy_dir is not None:
        args += ["--model.init_args.policy.path", str(policy_dir)]
    if heldout_size is not None:
        args += ["--data.heldout_size", str(heldout_size)]
    return cli_main(args, run=False)


class LoadPolicyWeights(L.Callback):
    """Loads a Lightning checkpoint's policy weights once the Trainer has built and placed the module (after
    ``configure_model``, as ``validate --ckpt_path`` loads a checkpoint), and only those: a warm-start checkpoint
    is compared under a SPIRAL config like a SPIRAL one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cast(torch.nn.Module, pl_module.policy).load_state_dict(_policy_weights(self.path)[0])


PerProblem = dict[str, dict[str, float]]
"""``{metric: {problem uid: value}}`` (NaN where the metric is undefined for that problem)."""


class CollectPerProblem(L.Callback):
    """Keeps the per-problem values each ``validation_step`` returns (``{metric: tensor}``), for the metrics with
    exactly one value per problem of the batch (per-set diagnostics of RSA, with several sets per problem, are
    left out), keyed by the problem's uid."""

    def __init__(self) -> None:
        self.values: PerProblem = {}

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, Mapping):
            return
        problems = cast(list[Problem], batch)
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == len(problems):
                values = value.detach().double().cpu().tolist()
                self.values.setdefault(name, {}).update(zip((p.uid for p in problems), values, strict=True))


def _policy_weights(path: Path, mmap: bool = False) -> tuple[dict[str, Any], str | None]:
    """The policy's weights in a Lightning checkpoint, named as in the policy (without ``policy.``), and the
    ``policy.path`` it was trained from (None if not recorded)."""
    # A local, trusted Lightning checkpoint: its hyperparameters hold config dataclasses, not only tensors.
    checkpoint = load_checkpoint_file(path, mmap=mmap)
    state = checkpoint.get("state_dict", {})
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    return weights, checkpoint_policy_path(checkpoint)


def check_checkpoints(specs: dict[str, Path], config: str, overrides: Sequence[str] = ()) -> None:
    """Before any is evaluated: the config with ``overrides`` parses, every directory is a Hugging Face model and
    every ``.ckpt`` fits the config's model (names, shapes), so a wrong entry fails at once instead of after the
    others were evaluated."""
    cli = _build(config, overrides=overrides)  # a mistyped override fails here, not after the first checkpoint
    for name, path in specs.items():
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise UserError(
                f"--checkpoints entry {name}={path}: the directory has no config.json (nor adapter_config.json), so "
                "it is not a Hugging Face model directory; give a save_pretrained directory (e.g. a run's hf/) or "
                "a Lightning .ckpt file"
            )
    files = {name: path for name, path in specs.items() if path.is_file()}
    if not files:
        return
    # The config's precision (e.g. bf16-true weights), as ``validate`` builds the module.
    with cli.trainer.precision_plugin.module_init_context():
        cli.model.configure_model()
    try:
        expected, ours = cli.model.policy.state_dict(), cli.model.policy_config.path
        for name, path in files.items():
            saved, trained_from = _policy_weights(path, mmap=True)
            problems = state_dict_mismatch(saved, expected) if saved else ["it holds no policy.* weights"]
            if problems:
                source = f"; it was trained from policy.path={trained_from!r}" if trained_from else ""
                raise UserError(
                    f"--checkpoints entry {name}={path}: the checkpoint does not fit the config's model "
                    f"(policy.path={ours!r}{source}): {'; '.join(problems)}. "
                    "Compare it with the --config of the run that wrote it, or export it "
                    f"({PROG} export) and give the exported directory"
                )
    finally:
        cli.model.runtime.close()


def evaluate_checkpoint(
    name: str, checkpoint: Path, config: str, heldout_size: int | None, overrides: Sequence[str] = ()
) -> tuple[dict[str, float], PerProblem]:
    """Mean of every evaluation metric of one checkpoint over the config's held-out problems: ``trainer.validate``
    logs ``val/<metric>`` (:func:`~spiral_lit.training.strategy.log_eval_metrics`); returned without ``val/``.
    Also the values of the metrics with one value per problem, ``{metric: {uid: value}}``
    (:class:`CollectPerProblem`)."""
    cli = _build(config, checkpoint if checkpoint.is_dir() else None, heldout_size, overrides)
    # Without a logger, validate would save the config into the working directory: compare writes only --out.
    # Trainer.callbacks is set by Lightning's callback connector, unannotated.
    callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, SaveConfigCallback)]  # type: ignore[attr-defined]
    collect = CollectPerProblem()
    callbacks += [LoadPolicyWeights(checkpoint)] if checkpoint.is_file() else []
    cli.trainer.callbacks = [*callbacks, collect]  # type: ignore[attr-defined]
    print(f"[spiral_lit] evaluating {name} ({checkpoint}) on {len(cli.datamodule.heldout)} held-out problems")
    try:
        (logged,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        if cli.model.runtime is not None:
            cli.model.runtime.close()
    means = {key.removeprefix("val/"): value for key, value in logged.items() if key.startswith("val/")}
    return means, collect.values


INTERVAL_FIELDS = ["checkpoint", "baseline", "metric", "n_problems", "difference", "low", "high"]
KEY_METRICS = ("search/pass@1", "aggregation/accuracy")
"""Printed with their intervals, with RSA's accuracy after its last round, where the config measures them."""


def interval_rows(per_problem: dict[str, PerProblem]) -> list[dict[str, Any]]:
    """For every checkpoint and every one listed before it (its baseline), and every per-problem metric both have:
    the mean difference and its paired bootstrap 95% interval, over the problems where both values are finite
    (a metric defined on fewer than 2 of them is left out). Rows come checkpoint by checkpoint, baselines in
    their listed order: base, warm start, trained gives warm start - base, then trained - base and trained - warm
    start, without a second evaluation."""
    names = list(per_problem)
    rows: list[dict[str, Any]] = []
    for j, name in enumerate(names):
        for first in names[:j]:
            rows += _pair_rows(per_problem, first, name)
    return rows


def _pair_rows(per_problem: dict[str, PerProblem], first: str, name: str) -> list[dict[str, Any]]:
    """:func:`interval_rows` of checkpoint ``name`` against ``first``."""
    rows: list[dict[str, Any]] = []
    baseline, other = per_problem[first], per_problem[name]
    for metric in sorted(baseline.keys() & other.keys()):
        a, b = baseline[metric], other[metric]
        uids = [u for u in a if u in b and math.isfinite(a[u]) and math.isfinite(b[u])]
        if len(uids) < 2:
            continue
        a_N = torch.tensor([a[u] for u in uids], dtype=torch.float64)
        b_N = torch.tensor([b[u] for u in uids], dtype=torch.float64)
        difference, low, high = paired_bootstrap_interval(a_N, b_N)
        values = [name, first, metric, len(uids), difference, low, high]
        rows.append(dict(zip(INTERVAL_FIELDS, values, strict=True)))
    return rows


def _print_intervals(rows: list[dict[str, Any]]) -> None:
    """One line per compared pair with the key metrics' differences (``+0.031 [-0.004, +0.066]``)."""
    by_pair: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_pair.setdefault((row["checkpoint"], row["baseline"]), {})[row["metric"]] = row
    for (name, _), found in by_pair.items():
        rsa = [m for m in found if m.startswith("rsa/accuracy@")]
        keys = [m for m in KEY_METRICS if m in found] + sorted(rsa, key=lambda m: int(m.rpartition("@")[2]))[-1:]
        if not keys:
            continue
        first = found[keys[0]]
        parts = [f"{m} {found[m]['difference']:+.3f} [{found[m]['low']:+.3f}, {found[m]['high']:+.3f}]" for m in keys]
        print(
            f"[spiral_lit] {name} - {first['baseline']} (paired 95% interval, {first['n_problems']} problems): "
            + ", ".join(parts)
        )


def write_per_problem(per_problem: dict[str, PerProblem], path: Path) -> None:
    """``checkpoint,metric,uid,value`` for every per-problem value (NaN written as ``nan``)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "metric", "uid", "value"])
        for name, metrics in per_problem.items():
            for metric, values in sorted(metrics.items()):
                writer.writerows([name, metric, uid, value] for uid, value in values.items())


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_table(rows: list[dict[str, Any]], out: Path, name: str, fields: list[str] | None = None) -> None:
    """``name.csv`` and ``name.json`` (a list of row objects; NaN as null); ``fields``: the CSV's columns (default:
    the first row's keys), so that a table without rows still has its header."""
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else ["checkpoint"]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps([{k: _json_value(v) for k, v in r.items()} for r in rows], indent=1))


def compare(
    checkpoints: list[str],
    config: str,
    out: str = "runs/compare",
    heldout_size: int | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Evaluate checkpoints on the same held-out problems and seeds; write tables and plots.

    Args:
        checkpoints: ``name=path`` entries: a Hugging Face directory or a Lightning ``.ckpt``.
        config: A run YAML (task, held-out split, prompts, sampling, ``eval`` scaffolds).
        out: Output directory for the tables, PNGs and TensorBoard events: new, empty or an earlier compare output.
        heldout_size: Evaluate only the first this many held-out problems (default: the config's).
        overwrite: Replace what ``out`` holds even if spiral_lit did not write it (never a checkpoint or the config).
        overrides: Command-line options applied over ``config`` for every checkpoint (``main`` takes them after
            ``--``).
    """
    specs = parse_checkpoints(checkpoints)
    inputs = [(f"the checkpoint {name}", path) for name, path in specs.items()] + [("the config (--config)", config)]
    check_output(out, **OUT, overwrite=overwrite, protected=inputs)
    check_checkpoints(specs, config, overrides)
    evaluated = {name: evaluate_checkpoint(name, path, config, heldout_size, overrides) for name, path in specs.items()}
    metrics = {name: means for name, (means, _) in evaluated.items()}
    per_problem = {name: values for name, (_, values) in evaluated.items()}
    intervals = interval_rows(per_problem)
    rows = [
        {"checkpoint": c, "metric": k, "value": v} for c, values in metrics.items() for k, v in sorted(values.items())
    ]
    curves = curve_rows(metrics)
    with atomic_dir(out, **OUT, overwrite=overwrite, protected=inputs) as tmp:
        write_table(rows, tmp, "metrics")
        write_table(curves, tmp, "curves")
        write_table(intervals, tmp, "intervals", INTERVAL_FIELDS)
        write_per_problem(per_problem, tmp / "per_problem.csv")
        writer = SummaryWriter(str(tmp / "tensorboard"))
        for figure_name, draw in FIGURES.items():
            figure = draw(curves)
            figure.savefig(tmp / f"{figure_name}.png", dpi=120)
            writer.add_figure(f"compare/{figure_name}", figure)
        writer.close()
    _print_intervals(intervals)
    print(f"[spiral_lit] compared {', '.join(specs)} -> {out}")
    return Path(out)


def _as_one_list(argv: list[str], option: str) -> list[str]:
    """``--checkpoints a=x b=y`` -> ``--checkpoints '["a=x", "b=y"]'`` (jsonargparse reads a list as one value)."""
    out, i = [], 0
    while i < len(argv):
        name, sep, first = argv[i].partition("=")
        if name != option:
            out.append(argv[i])
            i += 1
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values = [first] * bool(sep) + argv[i + 1 : j]
        out += [option, values[0] if len(values) == 1 and values[0].startswith("[") else json.dumps(values)]
        i = j
    return out


def _bare_flag(argv: list[str], option: str) -> list[str]:
    """``--overwrite`` alone (at the end or before another option) -> ``--overwrite true``, as export takes it."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == option and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: list[str] | None = None) -> Path:
    # jsonargparse's auto_cli drops a parameter named ``config``, so the parser is built from the signature here.
    parser = ArgumentParser(prog=f"{PROG} compare", description=cast(str, compare.__doc__).splitlines()[0])
    parser.add_function_arguments(compare, as_group=False, skip={"overrides"})
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    argv, overrides = argv[:split], argv[split + 1 :]
    args = parser.parse_args(_bare_flag(_as_one_list(argv, "--checkpoints"), "--overwrite"))
    return compare(**args.as_dict(), overrides=overrides)


if __name__ == "__main__":
    run_alias("compare", __spec__)
