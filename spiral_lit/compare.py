"""Compare checkpoints on the same held-out problems and seeds (issue 4).

    python -m spiral_lit.compare --config experiments/quickstart/compare.yaml --out runs/quickstart/compare \\
        --checkpoints warmstart=runs/quickstart/warmstart/hf spiral=runs/quickstart/spiral/hf

``--config`` is any run YAML of ``python -m spiral_lit``: its task, held-out split, prompts,
sampling and ``eval`` section (which scaffolds are measured) are read through the project's
CLI parser. Each checkpoint is ``name=path``: a Hugging Face directory (``save_pretrained``,
e.g. a run's ``hf/`` export), or a Lightning ``.ckpt`` whose policy weights are loaded over the
config's ``model.init_args.policy.path`` (which then gives the architecture and tokenizer).
Seeds derive from ``eval.seed`` and each problem's uid, so every checkpoint sees the same
problems and draws, and the numbers equal those ``python -m spiral_lit validate`` logs with the
same config.

Writes into ``--out``: ``metrics.csv``/``.json`` (each metric's mean per checkpoint),
``curves.csv``/``.json`` (accuracy, generated and prompt tokens per scaffold and x: token
budget, k or RSA round), ``accuracy_vs_tokens.png``, ``pass_at_k.png``, ``rsa_rounds.png``, and
the same figures in TensorBoard (``tensorboard --logdir OUT``). Plotting needs matplotlib
(``pip install -e ".[plots]"``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from jsonargparse import ArgumentParser
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from spiral_lit.checkpointing import load_checkpoint_file
from spiral_lit.cli import main as cli_main
from spiral_lit.plots import FIGURES, curve_rows


def parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    """``["name=path", ...]`` -> ``{name: path}``; the path must be a directory or a ``.ckpt`` file."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoints entry {spec!r}: expected name=path")
        if name in out:
            raise ValueError(f"--checkpoints entry {spec!r}: the name {name!r} is used twice")
        checkpoint = Path(path)
        if not (checkpoint.is_dir() or (checkpoint.is_file() and checkpoint.suffix == ".ckpt")):
            raise FileNotFoundError(
                f"--checkpoints entry {spec!r}: {path} is neither a Hugging Face directory nor a Lightning .ckpt file"
            )
        out[name] = checkpoint
    if not out:
        raise ValueError("--checkpoints: give at least one name=path")
    return out


def evaluate_checkpoint(name: str, checkpoint: Path, config: str, heldout_size: int | None) -> dict[str, float]:
    """Mean of every evaluation metric of one checkpoint over the config's held-out problems."""
    args = ["--config", config, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    if checkpoint.is_dir():
        args += ["--model.init_args.policy.path", str(checkpoint)]
    if heldout_size is not None:
        args += ["--data.heldout_size", str(heldout_size)]
    # LightningCLI warns when given args while sys.argv holds other ones (here: compare's own).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = cli_main(args, run=False)
    module, data = cli.model, cli.datamodule
    # The config's precision (e.g. bf16-true weights, bf16-mixed autocast), as `validate` applies it.
    precision = cli.trainer.precision_plugin
    with precision.module_init_context():
        module.configure_model()
    if checkpoint.is_file():
        # A local, trusted Lightning checkpoint: its hyperparameters hold config dataclasses, not only tensors.
        state = load_checkpoint_file(checkpoint)["state_dict"]
        module.policy.load_state_dict(
            {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        )
    module.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    problems, size = data.heldout, data.eval_batch_size
    try:
        with tqdm(total=len(problems), desc=name, unit="problem") as bar:
            for start in range(0, len(problems), size):
                batch = problems[start : start + size]
                with precision.val_step_context(), torch.inference_mode():
                    values = module.evaluate_batch(batch)
                for key, value in values.items():
                    kept = value.double()[~value.isnan()]
                    sums[key] = sums.get(key, 0.0) + float(kept.sum())
                    counts[key] = counts.get(key, 0) + kept.numel()
                bar.update(len(batch))
    finally:
        module.runtime.close()
    return {key: sums[key] / counts[key] if counts[key] else math.nan for key in sums}


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_table(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    """``name.csv`` and ``name.json`` (a list of row objects; NaN as null)."""
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["checkpoint"])
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps([{k: _json_value(v) for k, v in r.items()} for r in rows], indent=1))


def compare(checkpoints: list[str], config: str, out: str = "runs/compare", heldout_size: int | None = None) -> Path:
    """Evaluate checkpoints on the same held-out problems and seeds; write tables and plots.

    Args:
        checkpoints: ``name=path`` entries: a Hugging Face directory or a Lightning ``.ckpt``.
        config: A run YAML (task, held-out split, prompts, sampling, ``eval`` scaffolds).
        out: Output directory for the tables, PNGs and TensorBoard events.
        heldout_size: Evaluate only the first this many held-out problems (default: the config's).
    """
    specs = parse_checkpoints(checkpoints)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {name: evaluate_checkpoint(name, path, config, heldout_size) for name, path in specs.items()}
    rows = [
        {"checkpoint": c, "metric": k, "value": v} for c, values in metrics.items() for k, v in sorted(values.items())
    ]
    write_table(rows, out_dir, "metrics")
    curves = curve_rows(metrics)
    write_table(curves, out_dir, "curves")
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for figure_name, draw in FIGURES.items():
        figure = draw(curves)
        figure.savefig(out_dir / f"{figure_name}.png", dpi=120)
        writer.add_figure(f"compare/{figure_name}", figure)
    writer.close()
    print(f"[spiral_lit] compared {', '.join(specs)} -> {out_dir}")
    return out_dir


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


def main(argv: list[str] | None = None) -> Path:
    # jsonargparse's auto_cli drops a parameter named ``config``, so the parser is built from the signature here.
    parser = ArgumentParser(prog="python -m spiral_lit.compare", description=compare.__doc__.splitlines()[0])
    parser.add_function_arguments(compare, as_group=False)
    args = parser.parse_args(_as_one_list(sys.argv[1:] if argv is None else argv, "--checkpoints"))
    return compare(**args.as_dict())


if __name__ == "__main__":
    main()
