"""The small-scale study (docs/algorithm.md §8.6): SPIRAL, its credit ablations and GRPO on the quickstart's task.

    python experiments/tiny_repro/run.py                 # the whole study (3 seeds)
    python experiments/tiny_repro/run.py --seeds 0       # one seed's rows (a later call with more seeds resumes)

1. build the quickstart's tiny Llama and tokenizer for countdown with ``+ -`` (``python -m spiral_lit tiny``);
2. warm-start it with the quickstart's two stages (``experiments/quickstart/warmstart_search.yaml``, then
   ``warmstart.yaml``: the aggregator audits its candidates and keeps a right one by reference); every RL run
   starts from this one checkpoint. ``--warmstart DIR`` reuses a finished one (the quickstart's
   ``runs/quickstart/warmstart/hf``) instead of spending the ~40 minutes again;
3. per seed, train every arm of :data:`ARMS` from it (the quickstart's ``spiral.yaml`` and ``grpo.yaml`` with the
   overrides listed there);
4. evaluate the warm start and every final checkpoint with ``python -m spiral_lit compare`` on the same 200
   held-out problems and evaluation seeds (the quickstart's ``compare.yaml`` with recursive aggregation to 10
   rounds: pass@k, majority vote, one aggregation of 4 candidates by number of correct ones, RSA);
5. write ``results.json`` / ``results.md`` (mean, spread and per-seed values) and the figures.

Every stage runs as its own process with one thread (``OMP_NUM_THREADS=1``) so numbers do not depend on the
thread count; ``--jobs`` of them run at once. Stages whose output exists are skipped and a training run that was
stopped continues from its ``last.ckpt`` (stop the study with ``kill -TERM -- -<its process group>``, or Ctrl-C,
which every stage gets: each training stage saves ``last.ckpt`` and exits), so an interrupted study resumes;
``--fresh`` starts over. Each process logs to ``<out>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QUICKSTART = REPO / "experiments" / "quickstart"
STEPS = 60
"""SPIRAL's steps of 8 prompts, as in the quickstart."""
GRPO_CEILING = ["--model.init_args.search_sampling.max_new_tokens", "184"]
"""16 GRPO traces of at most 184 tokens = SPIRAL's 8 x 48 + 16 x 160 = 2944 output tokens per prompt, the paper's
matching rule (docs/algorithm.md §5)."""
TWO_ROUNDS = ["--model.init_args.algorithm.train_rounds", "2", "--trainer.max_steps", "32"]
"""Two trained rounds of aggregation for 32 steps, which matches SPIRAL's generated tokens (see :data:`ARMS`)."""
ARMS: dict[str, tuple[str, list[str]]] = {
    "spiral": ("spiral", []),
    "spiral_per_role": ("spiral", ["--model.init_args.update.role_normalisation", "per_role"]),
    "spiral_search0": ("spiral", ["--model.init_args.update.search_weight", "0.0"]),
    "grpo": ("grpo", [*GRPO_CEILING, "--trainer.max_steps", str(STEPS)]),
    "grpo_matched": ("grpo", [*GRPO_CEILING, "--trainer.max_steps", "230"]),
    "spiral_t2": ("spiral", TWO_ROUNDS),
    "spiral_t2_per_role": ("spiral", [*TWO_ROUNDS, "--model.init_args.update.role_normalisation", "per_role"]),
    "spiral_t2_w05": ("spiral", [*TWO_ROUNDS, "--model.init_args.algorithm.next_round_weight", "0.5"]),
}
"""Arm -> (quickstart config, overrides). ``spiral`` is the quickstart's run (one normaliser over both roles'
tokens, docs/algorithm.md §4.5); ``spiral_per_role`` gives each role its own token mean (§4.6); ``spiral_search0``
trains the aggregator only (search weight 0), which says how much the set-RL credit of the search traces adds.
``grpo`` is GRPO at the same steps and output-token ceiling; its traces stop far below the ceiling, so
``grpo_matched`` trains it for 230 steps, which brings its generated tokens near SPIRAL's (~2M; the table reports
each run's own count). ``spiral_t2`` trains two rounds of aggregation (``train_rounds: 2``, §10) for 32 steps: a
step generates the search traces and two rounds of aggregations, and 32 steps were estimated from the ``spiral``
run's tokens per step (search 2.5k, aggregation 17.5k per rollout batch) to match its ~2M generated tokens.
``spiral_t2_per_role`` is ``spiral_t2`` with each role's own token mean: with two rounds the aggregation tokens
double and the search role's share of one shared mean halves (§4.6). ``spiral_t2_w05`` is ``spiral_t2`` with half
the weight on the next round's set credit of the first round's aggregations (``next_round_weight: 0.5``, §10).
``python run.py`` without ``--arms`` runs every arm."""
METHODS = tuple(ARMS)
COLOURS = {
    "warmstart": "grey",
    "spiral": "tab:red",
    "spiral_per_role": "tab:orange",
    "spiral_search0": "tab:purple",
    "grpo": "tab:blue",
    "grpo_matched": "tab:green",
    "spiral_t2": "tab:brown",
    "spiral_t2_per_role": "tab:pink",
    "spiral_t2_w05": "tab:olive",
}
LABELS = {
    "warmstart": "warm start",
    "spiral": "SPIRAL",
    "spiral_per_role": "SPIRAL, per-role mean",
    "spiral_search0": "SPIRAL, search weight 0",
    "grpo": "GRPO",
    "grpo_matched": "GRPO, token-matched",
    "spiral_t2": "SPIRAL, 2 trained rounds",
    "spiral_t2_per_role": "SPIRAL, 2 trained rounds, per-role mean",
    "spiral_t2_w05": "SPIRAL, 2 trained rounds, next-round weight 0.5",
}
GAPS = [
    ("spiral", "grpo"),
    ("spiral", "grpo_matched"),
    ("spiral_t2", "spiral"),
    ("spiral_t2_per_role", "spiral"),
    ("spiral_t2_w05", "spiral"),
]
"""The differences the results table shows (first minus second), where both arms ran."""
RSA_ROUNDS = 10
SET_SIZE = 4
TABLE_ROWS = [
    ("search/pass@1", "pass@1"),
    ("search/pass@4", "pass@4"),
    ("search/pass@8", "pass@8"),
    ("search/maj@4", "majority vote over 4 traces"),
    ("search/maj@8", "majority vote over 8 traces"),
    ("aggregation/set_majority", "majority vote over the 4 candidates shown"),
    ("aggregation/accuracy", "one aggregation of those 4 candidates"),
    *[(f"aggregation/accuracy_given_{c}correct", f"aggregation, {c} of 4 candidates correct") for c in range(5)],
    *[(f"rsa/accuracy@{t}", f"RSA round {t} (population mean)") for t in (1, 2, 4, 10)],
    (f"rsa/majority@{RSA_ROUNDS}", f"RSA round {RSA_ROUNDS}, majority vote"),
    ("aggregation/recovery", "recovery (set majority wrong)"),
    ("aggregation/override", "override (set majority right, aggregation wrong)"),
    ("search/length", "search trace length (tokens)"),
    ("aggregation/length", "aggregation trace length (tokens)"),
]


def log(message: str, start: float) -> None:
    print(f"[tiny_repro {time.monotonic() - start:7.0f}s] {message}", flush=True)


def run(cmd: list[str], log_path: Path, append: bool = False) -> None:
    """One stage as a single-threaded subprocess; its output goes to ``log_path`` (after what it holds, if
    ``append``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("a" if append else "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {done.returncode}; see {log_path}")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spiral_lit", *args]


def train_command(arm: str, seed: int, warmstart: Path, out: Path) -> list[str]:
    config, overrides = ARMS[arm]
    return cli(
        "fit", "--config", str(QUICKSTART / f"{config}.yaml"),
        "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.logger.init_args.name", f"{arm}_seed{seed}",
        "--model.init_args.policy.path", str(warmstart),
        *overrides,
    )  # fmt: skip


def compare_command(checkpoints: dict[str, Path], out_dir: Path) -> list[str]:
    """The quickstart's evaluation with recursive aggregation to the method's 10 rounds."""
    specs = [f"{name}={path}" for name, path in checkpoints.items()]
    return cli(
        "compare", "--config", str(QUICKSTART / "compare.yaml"), "--out", str(out_dir), "--checkpoints", *specs,
        "--", "--model.init_args.eval.rsa_rounds", str(RSA_ROUNDS),
    )  # fmt: skip


def read_metrics(compare_dir: Path) -> dict[str, dict[str, float | None]]:
    """``{checkpoint: {metric: value}}`` from a compare run's ``metrics.json``."""
    out: dict[str, dict[str, float | None]] = {}
    for row in json.loads((compare_dir / "metrics.json").read_text()):
        out.setdefault(row["checkpoint"], {})[row["metric"]] = row["value"]
    return out


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar a training run logged: ``{tag: [(step, value, wall time), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(s.step, s.value, s.wall_time) for s in events.Scalars(t)] for t in events.Tags()["scalars"]}


def latest_per_step(rows: list[tuple[int, float, float]]) -> list[tuple[int, float]]:
    """``(step, value)`` in step order, one per step. A run resumed from ``last.ckpt`` can log a step twice (before
    the stop and again after it); the later value is the one the finished run stands on."""
    by_step = {step: value for step, value, _ in rows}
    return sorted(by_step.items())


def read_entropy(scalars: dict[str, list[tuple[int, float, float]]]) -> tuple[list[int], list[float]]:
    """(steps, mean search-token entropy) of a training run."""
    rows = latest_per_step(scalars["train/entropy/search"])
    return [step for step, _ in rows], [value for _, value in rows]


def training_summary(scalars: dict[str, list[tuple[int, float, float]]]) -> dict[str, float]:
    """What a run spent and reached: generated tokens, wall time (first to last event, so a run that was stopped
    and resumed counts its pause too), and the reward of its last 20 steps."""
    tokens = sum(v for tag in ("tokens/search", "tokens/aggregation") for _, v in latest_per_step(scalars.get(tag, [])))
    walls = [w for rows in scalars.values() for _, _, w in rows]
    rewards = [v for _, v in latest_per_step(scalars["reward"])]
    _, entropy = read_entropy(scalars)
    return {
        "generated_tokens": tokens,
        "train_seconds": max(walls) - min(walls),
        "final_reward": statistics.fmean(rewards[-20:]),
        "first_entropy": entropy[0],
        "final_entropy": statistics.fmean(entropy[-20:]),
    }


def training_table(training: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: per method, mean (and per seed) tokens generated, train time, final reward and entropy."""
    lines = [
        "| method | generated tokens (M) | train time (s) | training reward, last 20 steps | search entropy, "
        "first step -> last 20 steps |",
        "|---|---|---|---|---|",
    ]
    for m, per_seed in training.items():
        runs = list(per_seed.values())

        def cell(key: str, fmt: str, scale: float = 1.0, runs: list[dict[str, float]] = runs) -> str:
            values = [r[key] * scale for r in runs]
            return f"{statistics.fmean(values):{fmt}} ({' / '.join(f'{v:{fmt}}' for v in values)})"

        lines.append(
            f"| {LABELS[m]} | {cell('generated_tokens', '.2f', 1e-6)} | {cell('train_seconds', '.0f')} | "
            f"{cell('final_reward', '.3f')} | {cell('first_entropy', '.3f')} -> {cell('final_entropy', '.3f')} |"
        )
    return "\n".join(lines)


def arms_of(by_arm: Mapping[str, Any]) -> list[str]:
    """The arms present in ``by_arm`` (``--arms`` may choose some), in :data:`ARMS`' order."""
    return [m for m in METHODS if m in by_arm]


def summarise(values: list[float | None]) -> dict[str, Any]:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return {"mean": None, "std": None, "values": values}
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0, "values": values}


def results_table(results: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: metric | warm start | each run's mean ± sd over seeds | SPIRAL minus each GRPO."""

    def cell(s: dict[str, Any], scale: float) -> str:
        return "-" if s["mean"] is None else f"{s['mean'] * scale:.1f} ± {s['std'] * scale:.1f}"

    def gap(a: dict[str, Any], b: dict[str, Any], scale: float) -> str:
        return "-" if a["mean"] is None or b["mean"] is None else f"{(a['mean'] - b['mean']) * scale:+.1f}"

    arms = arms_of(results)
    gaps = [(a, b) for a, b in GAPS if a in arms and b in arms]
    header = " | ".join([LABELS[m] for m in arms] + [f"{LABELS[a]} − {LABELS[b]}" for a, b in gaps])
    lines = [f"| metric | warm start | {header} |", "|---|" + "---|" * (len(arms) + len(gaps) + 1)]
    for key, label in TABLE_ROWS:
        scale = 1.0 if "length" in key else 100.0
        warm = results["warmstart"].get(key)
        cells = [cell(results[m][key], scale) for m in arms] + [
            gap(results[a][key], results[b][key], scale) for a, b in gaps
        ]
        lines.append(f"| {label} | {'-' if warm is None else f'{warm * scale:.1f}'} | {' | '.join(cells)} |")
    return "\n".join(lines)


def per_seed_table(results: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: one row per (run, seed) with the headline metrics, so a re-run seed can be checked row by row."""
    keys = ["search/pass@1", "search/pass@8", "aggregation/set_majority", "aggregation/accuracy", "rsa/accuracy@1"]
    keys += ["rsa/accuracy@4", f"rsa/accuracy@{RSA_ROUNDS}"]
    lines = ["| run | seed | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for m in arms_of(results):
        for i, seed in enumerate(seeds):
            values = [results[m][k]["values"][i] for k in keys]
            cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in values)
            lines.append(f"| {LABELS[m]} | {seed} | {cells} |")
    return "\n".join(lines)


def plot_curves(
    per_seed: dict[str, dict[int, dict[str, float | None]]], warm: dict[str, float | None], out: Path
) -> None:
    """RSA by round and pass@k / maj@k: mean over seeds with min-max bands."""
    figure, (rsa_ax, k_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = list(range(RSA_ROUNDS + 1))
    ks = [1, 2, 4, 8]
    for name in arms_of(per_seed):
        colour = COLOURS[name]
        for ax, xs, key in ((rsa_ax, rounds, "rsa/accuracy@{}"), (k_ax, ks, "search/pass@{}")):
            ys = [[per_seed[name][s][key.format(x)] for s in per_seed[name]] for x in xs]
            ax.plot(xs, [statistics.fmean(y) for y in ys], marker="o", color=colour, label=LABELS[name])
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.15)
        ys = [[per_seed[name][s][f"search/maj@{k}"] for s in per_seed[name]] for k in ks]
        k_ax.plot(ks, [statistics.fmean(y) for y in ys], "--", marker="s", color=colour, label=f"{LABELS[name]} maj@k")
    rsa_ax.plot(rounds, [warm[f"rsa/accuracy@{t}"] for t in rounds], ":", marker="o", color="grey", label="warm start")
    k_ax.plot(ks, [warm[f"search/pass@{k}"] for k in ks], ":", marker="o", color="grey", label="warm start pass@k")
    rsa_ax.set(title="Recursive self-aggregation (N=8, K=4)", xlabel="round", ylabel="accuracy", xticks=rounds)
    k_ax.set(title="Parallel sampling", xlabel="k samples", ylabel="accuracy", xscale="log")
    k_ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    k_ax.set_xticks(ks, [str(k) for k in ks])
    for ax in (rsa_ax, k_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "scaffolds.png", dpi=110)
    plt.close(figure)


def plot_by_correct(results: dict[str, Any], out: Path) -> None:
    """Aggregation accuracy by how many of the 4 candidates were correct."""
    labels = [str(c) for c in range(SET_SIZE + 1)]
    keys = [f"aggregation/accuracy_given_{c}correct" for c in range(SET_SIZE + 1)]
    figure, ax = plt.subplots(figsize=(7, 3.5))
    arms = arms_of(results)
    width = 0.8 / (len(arms) + 1)
    for i, name in enumerate(("warmstart", *arms)):
        means = [
            (results[name].get(k) or 0.0) if name == "warmstart" else (results[name][k]["mean"] or 0.0) for k in keys
        ]
        errors = [0.0 if name == "warmstart" else (results[name][k]["std"] or 0.0) for k in keys]
        xs = [x + (i - len(arms) / 2) * width for x in range(len(keys))]
        ax.bar(xs, means, width, yerr=errors, color=COLOURS[name], label=LABELS[name])
    ax.set_xticks(range(len(keys)), labels)
    ax.set(xlabel="correct candidates in the set", ylabel="aggregation accuracy", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "aggregation_by_correct.png", dpi=110)
    plt.close(figure)


def plot_entropy(entropy: dict[str, dict[int, tuple[list[int], list[float]]]], out: Path, window: int = 10) -> None:
    """Mean over seeds of the search-token entropy, smoothed over ``window`` steps, per run."""
    figure, ax = plt.subplots(figsize=(6, 3.5))
    for name in arms_of(entropy):
        runs = [dict(zip(steps, values, strict=True)) for steps, values in entropy[name].values()]
        steps = sorted(set.intersection(*(set(run) for run in runs)))  # the steps every seed logged
        mean = [statistics.fmean(run[step] for run in runs) for step in steps]
        smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
        style = "--" if name == "grpo_matched" else "-"
        ax.plot(steps, smooth, style, color=COLOURS[name], label=LABELS[name])
    ax.set(title=f"Search-token entropy (mean of seeds, {window}-step average)", xlabel="step", ylabel="nats")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "entropy.png", dpi=110)
    plt.close(figure)


def build_warmstart(out: Path, start: float) -> Path:
    """The quickstart's tiny model and two warm-start stages under ``out`` (skipped where finished); the
    both-roles checkpoint every arm starts from."""
    if not (out / "tiny" / "config.json").exists():
        log("building the tiny model and tokenizer", start)
        # The quickstart's run.sh, stage 1, from the same config.
        run(
            cli("tiny", "--config", str(QUICKSTART / "tiny.yaml"), "--out", str(out / "tiny")),
            out / "logs" / "tiny.log",
        )
    stages = [(stage, source) for stage, source in (("warmstart_search", "tiny"), ("warmstart", "warmstart_search/hf"))
              if not (out / stage / "hf" / "config.json").exists()]  # fmt: skip
    if stages:
        # As the quickstart's run.sh: bf16-mixed only where this CPU runs bf16 matmuls at least as fast as fp32
        # ones, timed with the stages' one thread.
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        timed = subprocess.run(cli("cpu_precision"), cwd=REPO, env=env, capture_output=True, text=True, check=True)
        precision = timed.stdout.strip()
    for stage, source in stages:
        log(f"{stage}: supervised warm start (experiments/quickstart/{stage}.yaml, {precision})", start)
        shutil.rmtree(out / stage, ignore_errors=True)
        run(
            cli("fit", "--config", str(QUICKSTART / f"{stage}.yaml"),
                "--trainer.logger.init_args.save_dir", str(out), "--trainer.precision", precision,
                "--model.init_args.policy.path", str(out / source)),
            out / "logs" / f"{stage}.log",
        )  # fmt: skip
        log(f"finished {stage}", start)
    return out / "warmstart" / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tiny_repro")
    parser.add_argument("--warmstart", type=Path, help="a finished both-roles warm start (hf/ folder) to reuse")
    parser.add_argument("--figures", type=Path, default=HERE / "figures", help="where the PNGs and results go")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    start = time.monotonic()
    out: Path = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.warmstart is not None and not (args.warmstart / "config.json").exists():
        raise SystemExit(f"--warmstart {args.warmstart}: no config.json there (expected a warm start's hf/ folder)")
    warmstart = args.warmstart.resolve() if args.warmstart is not None else build_warmstart(out, start)
    methods = [m for m in METHODS if m in args.arms]

    def train(job: tuple[str, int]) -> None:
        arm, seed = job
        name = f"{arm}_seed{seed}"
        if (out / name / "hf" / "config.json").exists():
            return
        command, last = train_command(arm, seed, warmstart, out), out / name / "checkpoints" / "last.ckpt"
        if last.is_file():  # stopped (SIGTERM or Ctrl-C save it): continue exactly where it stopped
            log(f"resuming {name} from {last}", start)
            command += ["--ckpt_path", str(last)]
        else:
            shutil.rmtree(out / name, ignore_errors=True)
            log(f"training {name}", start)
        run(command, out / "logs" / f"{name}.log", append=last.is_file())
        log(f"finished {name}", start)

    def evaluate(job: tuple[str, dict[str, Path]]) -> None:
        name, checkpoints = job
        if (out / name / "metrics.json").exists():
            return
        log(f"evaluating {', '.join(checkpoints)} -> {name}", start)
        run(compare_command(checkpoints, out / name), out / "logs" / f"{name}.log")
        log(f"finished {name}", start)

    def train_then_evaluate(job: tuple[str, int]) -> None:
        arm, seed = job
        train(job)
        evaluate((f"compare_{arm}_seed{seed}", {arm: out / f"{arm}_seed{seed}" / "hf"}))

    # Evaluation seeds come from eval.seed and the problem, not the process, so evaluating each checkpoint in its
    # own compare run gives the numbers a joint run would.
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(evaluate, ("compare_warmstart", {"warmstart": warmstart}))]
        jobs += [pool.submit(train_then_evaluate, (m, s)) for s in args.seeds for m in methods]
        for job in jobs:
            job.result()

    warm = read_metrics(out / "compare_warmstart")["warmstart"]
    per_seed = {m: {s: read_metrics(out / f"compare_{m}_seed{s}")[m] for s in args.seeds} for m in methods}
    keys = sorted({k for m in methods for s in args.seeds for k in per_seed[m][s]})
    results: dict[str, Any] = {"warmstart": warm}
    for m in methods:
        results[m] = {k: summarise([per_seed[m][s].get(k) for s in args.seeds]) for k in keys}
    scalars = {m: {s: read_scalars(out / f"{m}_seed{s}") for s in args.seeds} for m in methods}
    entropy = {m: {s: read_entropy(scalars[m][s]) for s in args.seeds} for m in methods}
    training = {m: {s: training_summary(scalars[m][s]) for s in args.seeds} for m in methods}
    figures: Path = args.figures
    figures.mkdir(parents=True, exist_ok=True)
    plot_curves(per_seed, warm, figures)
    plot_by_correct(results, figures)
    plot_entropy(entropy, figures)
    results["training"] = {m: {str(s): v for s, v in t.items()} for m, t in training.items()}
    results["settings"] = {"seeds": args.seeds, "arms": methods, "jobs": args.jobs, "warmstart": str(warmstart)}
    (figures / "results.json").write_text(json.dumps(results, indent=1))
    tables = [results_table(results, args.seeds), per_seed_table(results, args.seeds), training_table(training)]
    table = "\n\n".join(tables)
    (figures / "results.md").write_text(table + "\n")
    print(table)
    log(f"done; results and figures in {figures}", start)


if __name__ == "__main__":
    main()
