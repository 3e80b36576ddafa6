"""glibc malloc tuning (spiral_lit/training/cpu_memory.py): large tensors come from the reusable heap, not fresh mmaps.

Each check runs in a fresh interpreter, because the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import TinyPolicy

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

MMAPPED_BLOCKS = textwrap.dedent(
    """
    import ctypes, torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    {setup}
    before = libc.mallinfo2().hblks
    tensor = torch.ones(64 << 18)  # 64 MiB, above any mmap threshold glibc allows
    print(libc.mallinfo2().hblks - before)
    """
)


def _mmapped_blocks(setup: str) -> int:
    """How many more mmapped chunks glibc holds once a 64 MiB tensor exists, after running ``setup``."""
    code = MMAPPED_BLOCKS.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_large_tensor_is_mmapped_by_default_and_on_the_heap_after_keep_freed_memory() -> None:
    assert _mmapped_blocks("") == 1
    after = "from spiral_lit.training.cpu_memory import keep_freed_memory\nassert keep_freed_memory() is None"
    assert _mmapped_blocks(after) == 0


def test_callback_applies_it_when_a_cpu_trainer_runs() -> None:
    fit = textwrap.dedent(
        """
        import lightning as L, torch
        from spiral_lit.training.cpu_memory import KeepFreedCpuMemory

        class One(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
            def training_step(self, batch, idx):
                return (self.w - batch[0]).pow(2).sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
            def configure_callbacks(self):
                return [KeepFreedCpuMemory()]

        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(One(), [torch.ones(1)])
        """
    )
    assert _mmapped_blocks(fit) == 0


def test_modules_add_the_callback_unless_turned_off(tiny_policy: TinyPolicy) -> None:
    from spiral_lit import SpiralModule
    from spiral_lit.runtime.models import PolicyConfig
    from spiral_lit.training.cpu_memory import KeepFreedCpuMemory
    from spiral_lit.training.warm_start import WarmStartModule

    for module_class in (SpiralModule, WarmStartModule):
        on = module_class(PolicyConfig(str(tiny_policy.path)))
        off = module_class(PolicyConfig(str(tiny_policy.path)), cpu_keep_freed_memory=False)
        assert any(isinstance(c, KeepFreedCpuMemory) for c in on.configure_callbacks())
        assert not any(isinstance(c, KeepFreedCpuMemory) for c in off.configure_callbacks())
