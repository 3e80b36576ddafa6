"""experiments/task_probes/cross_aggregate.py: its check of a verdict line's own arithmetic, on hand-made lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "task_probes" / "cross_aggregate.py"


def test_arithmetic_holds_checks_every_step_of_a_verdict_line() -> None:
    spec = importlib.util.spec_from_file_location("cross_aggregate", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.arithmetic_holds("5+2=7 7-1=6 6-2=4 make 3 right")  # sound steps, wrong label: still sound
    assert not module.arithmetic_holds("7+8=15 15+6=21 21+3=25 make 25 right")
    assert module.arithmetic_holds("1-8=-7 -7+3=-4 -4+9=5 wrong")  # negative partial results
    assert module.arithmetic_holds("no answer")  # no steps to get wrong
