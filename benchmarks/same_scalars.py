"""Does a change of code leave training bit-identical? Run the same short fits on two revisions and compare every
TensorBoard scalar at every step.

For refactors that must not change behaviour (moving modules, merging copies): a 20-step warm start of both roles
from the quickstart's tiny model, then a 20-step quickstart SPIRAL fit from that warm start, each on one thread
with the same seeds, on revision ``--before`` and on ``--after`` (default: the working tree). Wall-clock scalars
(``time/*``, ``*_per_s``) are left out; every other scalar must be equal at every step, bit for bit.

    python benchmarks/same_scalars.py --before HEAD~1            # HEAD~1 against the working tree
    python benchmarks/same_scalars.py --before v1 --after v2 --steps 20 --out runs/same_scalars

Each revision is checked out with ``git worktree`` under ``--out`` and run with ``python -m spiral_lit`` from
there (the checkout shadows the installed package). Both sides start from one tiny model, built by the
``--before`` revision. Prints a table (tags compared, steps, tags that differ) and writes ``result.json``; exits
1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("warmstart", "spiral")


def _run(cwd: Path, *args: str) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    print(f"[same_scalars] ({cwd.name}) python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True)


def _checkout(rev: str | None, out: Path) -> Path:
    """The source tree of ``rev`` (a fresh worktree), or this working tree for None."""
    if rev is None:
        return ROOT
    tree = out / f"src-{rev.replace('/', '_').replace('~', '_')}"
    if tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    return tree


def _fits(tree: Path, tiny: Path, out: Path, steps: int) -> None:
    """The warm start, then SPIRAL from its export, both into ``out``."""
    common = [
        f"--trainer.max_steps={steps}", "--trainer.max_time=null", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
    ]  # fmt: skip
    _run(tree, "-m", "spiral_lit", "fit", "--config", "experiments/chain_sum/warmstart.yaml", *common,
         f"--model.init_args.policy.path={tiny}")  # fmt: skip
    _run(tree, "-m", "spiral_lit", "fit", "--config", "experiments/chain_sum/spiral.yaml", *common,
         f"--model.init_args.policy.path={out / 'warmstart' / 'hf'}")  # fmt: skip


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``run_dir`` but the wall-clock ones: tag -> [(step, value)] in event order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if not (tag.startswith("time/") or tag.endswith("_per_s")):
                out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return out


def compare(before: Path, after: Path) -> dict[str, dict[str, object]]:
    """Per run: how many tags and points were compared, and which tags differ (with their first difference)."""
    result: dict[str, dict[str, object]] = {}
    for run in RUNS:
        a, b = scalars(before / run), scalars(after / run)
        differ = {}
        for tag in sorted(set(a) | set(b)):
            if a.get(tag) != b.get(tag):
                pairs = zip(a.get(tag, []), b.get(tag, []), strict=False)
                first = next(((x, y) for x, y in pairs if x != y), (len(a.get(tag, [])), len(b.get(tag, []))))
                differ[tag] = {"first_difference": first}
        result[run] = {"tags": len(set(a) | set(b)), "points": sum(map(len, a.values())), "differ": differ}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--after", default=None, help="git revision (default: the working tree)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "same_scalars")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or give another --out")
    out.mkdir(parents=True)
    before_tree = _checkout(args.before, out)
    tiny = out / "tiny"
    _run(before_tree, "-m", "spiral_lit.tools.tiny", "--out", str(tiny))
    _fits(before_tree, tiny, out / "before", args.steps)
    _fits(_checkout(args.after, out), tiny, out / "after", args.steps)
    result = compare(out / "before", out / "after")
    print("\n| run | tags | points | tags that differ |\n|---|---|---|---|")
    for run, row in result.items():
        print(f"| {run} | {row['tags']} | {row['points']} | {len(row['differ'])} |")
    for run, row in result.items():
        for tag, info in row["differ"].items():  # type: ignore[union-attr]
            print(f"{run}: {tag} differs: {info}")
    (out / "result.json").write_text(json.dumps(result | {"before": args.before, "after": args.after}, indent=1))
    sys.exit(1 if any(row["differ"] for row in result.values()) else 0)


if __name__ == "__main__":
    main()
