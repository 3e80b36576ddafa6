"""experiments/quickstart/busy_check.sh: a busy machine changes when the quickstart finishes, never what it finds.

Every stage stops on a step count and every draw is seeded, so a shortened quickstart run alone and beside a busy
loop must leave bit-identical weights and per-problem results; a wall-clock-dependent decision would break it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_busy_machine_leaves_the_quickstart_bit_identical(tmp_path: Path) -> None:
    env = {**os.environ, "SEARCH_STEPS": "20", "BOTH_STEPS": "5", "SPIRAL_STEPS": "1", "PROBLEMS": "8"}
    done = subprocess.run(
        ["bash", "experiments/quickstart/busy_check.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for stage in ("tiny", "warmstart_search/hf", "warmstart/hf", "spiral/hf"):
        assert f"{stage} " in done.stdout and "DIFFER" not in done.stdout
    assert "the outcome did not depend on the load" in done.stdout
