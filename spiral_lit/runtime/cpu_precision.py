"""Whether bf16 pays on this CPU, measured rather than assumed.

On a CPU with native bf16 (AVX512-BF16, AMX) a bf16 matmul runs at about twice fp32's rate, so ``bf16-mixed`` speeds
up training. On one without it, oneDNN emulates bf16 far below fp32: on a 2-core AVX2 EPYC, a 1024 x 1024 matmul
ran at 0.9 GFLOP/s in bf16 against 50-110 in fp32, and a quickstart warm-start step took 8 s under ``bf16-mixed``
against 0.4 s in fp32 (docs/algorithm.md §8.7). CPU flags do not settle it (ARM, emulation quality, torch builds
differ), so this times the two dtypes on a matmul of a small model's shape, which takes a fraction of a second.

``python -m spiral_lit cpu_precision`` (:mod:`spiral_lit.tools.cpu_precision`) prints the faster of ``bf16-mixed``
and ``32-true`` for scripts (the quickstart's warm-start stages take it), and the CLI warns before training when
``trainer.precision`` or the policy's weights ask for bf16 on a CPU that runs it much slower
(:mod:`spiral_lit.reliability.preflight`).
"""

from __future__ import annotations

import time

import torch

SLOW_BF16 = 0.5
"""Below this bf16/fp32 speed ratio, asking for bf16 on this CPU gets a warning before training."""


def _matmul_seconds(dtype: torch.dtype, rows: int, width: int, repeats: int) -> float:
    """Fastest of ``repeats`` timings of ``[rows, width] @ [width, 4 width]`` (a small model's MLP shape)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=generator).to(dtype)
    b = torch.randn(width, 4 * width, generator=generator).to(dtype)
    a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def bf16_speedup(rows: int = 512, width: int = 256, repeats: int = 3) -> float:
    """fp32 time / bf16 time of one matmul on this CPU, with the threads torch uses now (> 1: bf16 is faster)."""
    fp32 = _matmul_seconds(torch.float32, rows, width, repeats)
    bf16 = _matmul_seconds(torch.bfloat16, rows, width, repeats)
    return fp32 / bf16


def faster_precision(speedup: float) -> str:
    """``bf16-mixed`` where bf16 matmuls are at least as fast as fp32 ones, else ``32-true``."""
    return "bf16-mixed" if speedup >= 1.0 else "32-true"
