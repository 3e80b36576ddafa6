"""experiments/quickstart/summary.py: the claims' intervals, on a hand-built compare output."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "summary.py"


def _summary():  # noqa: ANN202 - a script loaded by path
    spec = importlib.util.spec_from_file_location("quickstart_summary", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_within_checkpoint_intervals_pair_the_problems(tmp_path: Path) -> None:
    # 4 problems. spiral: aggregation right on all 4, majority on 1 of them -> +75 points, and every problem moves the
    # same way or not at all, so no resample can fall below 0 or exceed 100. RSA rounds 1 and 4 equal -> 0 [0, 0].
    rows = [("checkpoint", "metric", "uid", "value")]
    for uid in range(4):
        for checkpoint in ("spiral", "warmstart"):
            rows.append((checkpoint, "aggregation/accuracy", str(uid), "1.0"))
            rows.append((checkpoint, "aggregation/set_majority", str(uid), "1.0" if uid == 0 else "0.0"))
            rows.append((checkpoint, "rsa/accuracy@1", str(uid), "0.5"))
            rows.append((checkpoint, "rsa/accuracy@4", str(uid), "0.5"))
    with (tmp_path / "per_problem.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    (tmp_path / "intervals.csv").write_text(
        "checkpoint,baseline,metric,n_problems,difference,low,high\n"
        "spiral,warmstart,aggregation/accuracy,4,0.0,-0.1,0.1\n"
        "spiral,warmstart,aggregation/set_oracle,4,0.5,0.2,0.8\n"
    )
    got = {label: (round(d, 6), round(lo, 6), round(hi, 6)) for label, d, lo, hi in _summary().intervals(tmp_path)}
    assert got["spiral: one aggregation - majority over the same 4"][0] == 75.0
    low, high = got["spiral: one aggregation - majority over the same 4"][1:]
    assert 0.0 <= low <= 75.0 <= high <= 100.0
    assert got["warmstart: RSA round 4 - round 1"] == (0.0, 0.0, 0.0)
    # Between checkpoints: compare's own rows, only the metrics the claims use.
    assert got["spiral - warmstart: aggregation/accuracy"] == (0.0, -10.0, 10.0)
    assert not any("set_oracle" in label for label in got)
