"""``python -m spiral_lit cpu_precision``: print ``bf16-mixed`` or ``32-true``, whichever trains faster on this CPU
(timed on a matmul, :mod:`spiral_lit.runtime.cpu_precision`), for scripts such as the quickstart's ``run.sh``."""

from __future__ import annotations

import argparse
import sys

from spiral_lit.cli import PROG
from spiral_lit.runtime.cpu_precision import bf16_speedup, faster_precision


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} cpu_precision",
        description="Print the faster training precision on this CPU, bf16-mixed or 32-true, timed on a matmul; "
        "the measurement goes to stderr.",
    )
    parser.parse_args(argv)
    speedup = bf16_speedup()
    precision = faster_precision(speedup)
    print(f"[spiral_lit] bf16 matmuls run at {speedup:.2f}x fp32's speed on this CPU: {precision}", file=sys.stderr)
    print(precision)
    return precision
