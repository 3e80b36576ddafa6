"""Keep freed memory in the process on CPU, as a GPU caching allocator does (docs/algorithm.md §8.5).

PyTorch on CPU allocates every tensor with ``malloc`` and frees it when its last reference goes. glibc serves
an allocation above its mmap threshold (which it raises as memory is freed, but never past 32 MiB) with a fresh
``mmap`` and returns it to the kernel on ``free``; the next tensor of that size then takes a page fault per
4 KiB page as it is first written. A training step of a 50M-parameter model makes dozens of such tensors (a
micro-batch's MLP activations are 4096 x 2048 floats, 32 MiB), and on this 2-core machine the page faults cost
about a third of the update: the GRPO update of ``benchmarks/vs_trl.py``'s 50m model took 7.9 s (median of 6
steps) with glibc's defaults and 5.3 s with :func:`keep_freed_memory`, with no change to the maths.

:func:`keep_freed_memory` turns glibc's ``mmap`` chunks off (``M_MMAP_MAX = 0``: every allocation comes from the
heap, whose freed chunks are reused) and raises the threshold above which the top of the heap is given back.
It is process-wide and lasts until the process ends: memory the run has used stays mapped to it, so the resident
size stays near its peak instead of shrinking between steps (a CUDA caching allocator behaves the same way).
Elsewhere than glibc (macOS, musl) it does nothing. :class:`KeepFreedCpuMemory` applies it when a Trainer runs
on CPU; ``SpiralModule(cpu_keep_freed_memory=False)`` (YAML ``model.cpu_keep_freed_memory: false``) leaves the
allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
"""glibc ``mallopt`` parameter numbers (``malloc.h``)."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap beyond this goes back to the kernel (glibc's default: 128 KiB, adaptive)."""
TOP_PAD_BYTES = 64 << 20
"""Extra heap requested per growth, so a growing step does not call ``sbrk`` per tensor."""


def keep_freed_memory() -> str | None:
    """Configure glibc's ``malloc`` to reuse freed memory (module docstring); returns why not, or None if done."""
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"the C library is {libc_name or 'not glibc'}, not glibc"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))
    refused = [param for param, value in settings if libc.mallopt(param, value) != 1]
    return f"mallopt refused parameters {refused}" if refused else None


class KeepFreedCpuMemory(L.Callback):
    """Applies :func:`keep_freed_memory` at the start of a run on CPU (a GPU run allocates its tensors elsewhere)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        reason = keep_freed_memory()
        if reason is None:
            rank_zero_info("spiral_lit: glibc malloc keeps freed memory for reuse (model.cpu_keep_freed_memory)")
        else:
            rank_zero_info(f"spiral_lit: malloc left as it is: {reason}")
