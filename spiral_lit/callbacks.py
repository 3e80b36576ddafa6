"""Callbacks that every run uses: Hugging Face export of the policy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


def export_policy(module: L.LightningModule, out_dir: str | Path) -> Path:
    """Write the policy and tokenizer with ``save_pretrained`` into ``out_dir`` atomically.

    Written to a sibling temporary directory first and renamed, so a crash never leaves a
    half-written model where the next stage will look for one.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.policy.save_pretrained(tmp)
    module.runtime.tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


class HFExport(L.Callback):
    """At the end of ``fit``, export the policy as a Hugging Face directory the next stage loads."""

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Output directory; default ``<log_dir>/hf``.
        """
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.dirpath or os.path.join(trainer.log_dir or ".", "hf")
        path = export_policy(pl_module, out)
        print(f"[spiral_lit] exported the policy to {path}")
