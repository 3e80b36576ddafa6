"""Print the table of a ``compare`` output and say which of the quickstart's three claims held.

    python experiments/quickstart/summary.py runs/quickstart/compare

The claims the quickstart is meant to show (the SPIRAL checkpoint, 200 held-out problems, temperature 1.0):
1. one aggregation of 4 candidates is at least 5 points above majority vote over the same 4 candidates;
2. recursive aggregation (population 8, sets of 4) at round 4 is at least 3 points above round 1;
3. both are above the warm start's.
The numbers are what ``compare`` measured; this script only reads them, so it cannot tune them. Each claim's
difference also gets a paired bootstrap 95% interval over the problems: within a checkpoint from ``per_problem.csv``
with ``compare``'s bootstrap function, between checkpoints as ``compare`` wrote them (``intervals.csv``).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from spiral_lit.evaluation.metrics import paired_bootstrap_interval

ROWS = [
    ("search/pass@1", "one trace (pass@1)"),
    ("search/maj@4", "majority vote over 4 traces"),
    ("search/pass@4", "any of 4 traces right (pass@4)"),
    ("search/maj@8", "majority vote over 8 traces"),
    ("aggregation/set_majority", "majority vote over the 4 candidates shown"),
    ("aggregation/accuracy", "one aggregation of those 4 candidates"),
    ("aggregation/accuracy_given_1correct", "  ... when 1 of the 4 is right"),
    ("aggregation/accuracy_given_4correct", "  ... when all 4 are right"),
    ("rsa/accuracy@1", "recursive aggregation, round 1"),
    ("rsa/accuracy@2", "recursive aggregation, round 2"),
    ("rsa/accuracy@4", "recursive aggregation, round 4"),
    ("rsa/accuracy@10", "recursive aggregation, round 10"),
]


def load(out: Path) -> dict[str, dict[str, float]]:
    """{checkpoint: {metric: value}} from compare's ``metrics.json``."""
    metrics: dict[str, dict[str, float]] = {}
    for row in json.loads((out / "metrics.json").read_text()):
        metrics.setdefault(row["checkpoint"], {})[row["metric"]] = row["value"]
    return metrics


def claims(m: dict[str, dict[str, float]], trained: str = "spiral", base: str = "warmstart") -> list[tuple[str, bool]]:
    """Each claim of the module docstring with whether it held (values in [0, 1], margins in points)."""
    s, w = m[trained], m[base]
    return [
        (
            f"{trained}: aggregation {100 * s['aggregation/accuracy']:.1f} >= majority over the same 4 "
            f"{100 * s['aggregation/set_majority']:.1f} + 5",
            s["aggregation/accuracy"] >= s["aggregation/set_majority"] + 0.05,
        ),
        (
            f"{trained}: RSA round 4 {100 * s['rsa/accuracy@4']:.1f} >= round 1 {100 * s['rsa/accuracy@1']:.1f} + 3",
            s["rsa/accuracy@4"] >= s["rsa/accuracy@1"] + 0.03,
        ),
        (
            f"{trained} above {base}: aggregation {100 * s['aggregation/accuracy']:.1f} > "
            f"{100 * w['aggregation/accuracy']:.1f}, RSA round 4 {100 * s['rsa/accuracy@4']:.1f} > "
            f"{100 * w['rsa/accuracy@4']:.1f}",
            s["aggregation/accuracy"] > w["aggregation/accuracy"] and s["rsa/accuracy@4"] > w["rsa/accuracy@4"],
        ),
    ]


WITHIN = [
    # (label, metric subtracted, metric it is subtracted from), both of one checkpoint
    ("{c}: one aggregation - majority over the same 4", "aggregation/set_majority", "aggregation/accuracy"),
    ("{c}: RSA round 4 - round 1", "rsa/accuracy@1", "rsa/accuracy@4"),
]
BETWEEN = ["aggregation/accuracy", "rsa/accuracy@4", "search/pass@1"]
"""Metrics whose trained - base interval ``compare`` wrote to ``intervals.csv``."""


def per_problem(out: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(checkpoint, metric): {problem uid: value}} from compare's ``per_problem.csv``."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    with (out / "per_problem.csv").open() as f:
        for row in csv.DictReader(f):
            values.setdefault((row["checkpoint"], row["metric"]), {})[row["uid"]] = float(row["value"])
    return values


def intervals(out: Path, trained: str = "spiral", base: str = "warmstart") -> list[tuple[str, float, float, float]]:
    """(label, difference, low, high) in points: the claims within a checkpoint, paired over the problems with
    ``compare``'s bootstrap, then trained - base as ``compare`` wrote them."""
    values, rows = per_problem(out), []
    for checkpoint in (trained, base):
        for label, first, second in WITHIN:
            a, b = values[(checkpoint, first)], values[(checkpoint, second)]
            uids = sorted(a.keys() & b.keys())
            a_N, b_N = torch.tensor([a[u] for u in uids]), torch.tensor([b[u] for u in uids])
            mean, low, high = paired_bootstrap_interval(a_N, b_N)
            rows.append((label.format(c=checkpoint), 100 * mean, 100 * low, 100 * high))
    with (out / "intervals.csv").open() as f:
        for row in csv.DictReader(f):
            if (row["checkpoint"], row["baseline"]) == (trained, base) and row["metric"] in BETWEEN:
                diff, low, high = (100 * float(row[k]) for k in ("difference", "low", "high"))
                rows.append((f"{trained} - {base}: {row['metric']}", diff, low, high))
    return rows


def main(out: str) -> None:
    metrics = load(Path(out))
    names = list(metrics)
    print("| accuracy (%) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label in ROWS:
        if any(key in metrics[n] for n in names):
            cells = [f"{100 * metrics[n][key]:.1f}" if key in metrics[n] else "" for n in names]
            print(f"| {label} | " + " | ".join(cells) + " |")
    if {"spiral", "warmstart"} <= set(names):
        print()
        for text, held in claims(metrics):
            print(f"{'held' if held else 'NOT held'}: {text}")
        print("\npaired bootstrap 95% intervals over the problems, in points:")
        for label, mean, low, high in intervals(Path(out)):
            print(f"  {label}: {mean:+.1f} [{low:+.1f}, {high:+.1f}]")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/compare")
