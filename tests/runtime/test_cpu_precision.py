"""Timing bf16 against fp32 matmuls on this CPU (spiral_lit.runtime.cpu_precision) and the command built on it."""

from __future__ import annotations

import math

import pytest

from spiral_lit.cli import main
from spiral_lit.runtime.cpu_precision import bf16_speedup, faster_precision


def test_the_speedup_is_a_positive_ratio() -> None:
    speedup = bf16_speedup(rows=16, width=16, repeats=1)
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize(("speedup", "precision"), [(2.0, "bf16-mixed"), (1.0, "bf16-mixed"), (0.99, "32-true"),
                                                    (0.01, "32-true")])  # fmt: skip
def test_bf16_only_where_it_is_at_least_as_fast(speedup: float, precision: str) -> None:
    assert faster_precision(speedup) == precision


def test_the_command_prints_the_precision_alone_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    precision = main(["cpu_precision"])
    out, err = capsys.readouterr()
    assert out == f"{precision}\n" and precision in ("bf16-mixed", "32-true")
    assert "fp32's speed on this CPU" in err
