"""Checkpoints that survive crashes and refuse to load into the wrong model (docs/algorithm.md §8.4).

- :class:`AtomicCheckpointIO` (the CLI adds it to every run) writes a checkpoint to a hidden
  file beside its target, fsyncs it and renames it over the target, so ``last.ckpt`` is always
  either the previous checkpoint or the new one, never a torn file. Lightning's own
  ``TorchCheckpointIO`` writes to a temporary file in the system temp directory and moves it,
  which falls back to a non-atomic copy when that directory is on another filesystem, and never
  fsyncs. A failed write (full disk) raises :class:`CheckpointWriteError`, saying the previous
  checkpoint is intact.
- :func:`load_checkpoint_file` loads with ``weights_only=True``, allowing only spiral_lit's own
  config dataclasses (which a module built in Python, not through the CLI, keeps in its
  hyperparameters) besides tensors and plain containers, and names the path in every error.
- :func:`check_checkpoint_matches` compares a checkpoint's weights with the module before they
  are loaded, so a checkpoint of another model fails with its path and the first differences.
- Helpers that put per-rank state (RNG states, dynamic sampling's pending sequences) into the
  checkpoint that rank 0 writes.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
from collections.abc import Mapping
from dataclasses import is_dataclass
from pathlib import Path, PurePath
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.utilities import rank_zero_warn

from spiral_lit.errors import PathNotFoundError, UserError

_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""``--ckpt_path`` values that Lightning resolves itself."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file previously at that path is unchanged."""


class CheckpointReadError(UserError):
    """A checkpoint file is unreadable (torn, not a checkpoint, a directory) or holds objects a weights-only load
    refuses. A missing file raises ``FileNotFoundError``."""


class CheckpointMismatchError(UserError):
    """A checkpoint belongs to another model than the one it is loaded into."""


# ----------------------------------------------------------------------------- reading
def _allowed_global(name: str) -> type | None:
    """The class ``name`` if a weights-only load may build it: a spiral_lit config dataclass or a path."""
    module_name, _, attr = name.rpartition(".")
    if module_name.startswith("pathlib"):
        found = getattr(importlib.import_module(module_name), attr, None)
        return found if isinstance(found, type) and issubclass(found, PurePath) else None
    if not (module_name == "spiral_lit" or module_name.startswith("spiral_lit.")):
        return None
    try:
        found = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and is_dataclass(found) else None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint file, loaded with ``weights_only=True``; errors name the path and what is wrong."""
    file = Path(path)
    if file.is_dir():
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} is a directory: a sharded (distributed) checkpoint is loaded by its strategy "
            "(trainer.strategy: ModelParallelStrategy or FSDPStrategy), not as a file"
        )
    if not file.is_file():
        raise PathNotFoundError(
            f"checkpoint {str(path)!r} does not exist; give the path of a .ckpt file, or `--ckpt_path last` to "
            "continue from the newest last.ckpt of the run's checkpoint directory"
        )
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as error:
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint (truncated, or not a checkpoint): {error}"
        ) from error
    allowed = {name: _allowed_global(name) for name in unsafe}
    refused = sorted(name for name, cls in allowed.items() if cls is None)
    if refused:
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} holds objects of {refused}, which a weights-only load refuses; spiral_lit "
            "only unpickles tensors, plain containers and its own config dataclasses. If you trust the file, load "
            "it yourself with torch.load(..., weights_only=False)"
        )
    with torch.serialization.safe_globals([cls for cls in allowed.values() if cls is not None]):
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)


def checkpoint_policy_path(checkpoint: Mapping[str, Any]) -> str | None:
    """The ``policy.path`` a checkpoint was trained from, as its hyperparameters record it."""
    policy = checkpoint.get("hyper_parameters", {}).get("policy")
    path = policy.get("path") if isinstance(policy, Mapping) else getattr(policy, "path", None)
    return None if path is None else str(path)


def same_policy_path(a: str, b: str) -> bool:
    """Whether two ``policy.path`` values name the same model (local paths compared after resolving)."""
    if a == b:
        return True
    return Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_resume_config(ckpt_path: str, class_path: str | None, policy_path: str | None) -> dict[str, Any]:
    """Before anything is built: ``ckpt_path`` loads and was written by this model class on this policy.

    Returns the checkpoint's hyperparameters. Called by the CLI for explicit paths (Lightning resolves
    ``last``/``best`` later; :func:`check_checkpoint_matches` covers those).
    """
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
    hparams = checkpoint.get("hyper_parameters", {})
    saved_class = hparams.get("_class_path")
    if class_path and saved_class and saved_class != class_path:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_path!r} was written by model class {saved_class}, but the config's model.class_path "
            f"is {class_path}: it belongs to another stage or model"
        )
    saved_policy = checkpoint_policy_path(checkpoint)
    if policy_path and saved_policy and not same_policy_path(saved_policy, policy_path):
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_path!r} was trained from model.init_args.policy.path={saved_policy!r}, but the "
            f"config gives {policy_path!r}: it belongs to another model. Resume with the config of the run "
            f"that wrote it, or set model.init_args.policy.path={saved_policy!r}"
        )
    return hparams


def state_dict_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any], strict: bool = True) -> list[str]:
    """Human-readable differences between a saved state dict and the model's (empty when they match)."""
    problems = []
    if strict:
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing:
            problems.append(f"{len(missing)} of the model's weights are not in it (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} of its weights are not in the model (e.g. {unexpected[:3]})")
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(saved) & set(expected))
        if hasattr(saved[k], "shape") and hasattr(expected[k], "shape") and saved[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} weights differ in shape ({'; '.join(shapes[:3])})")
    return problems


def check_checkpoint_matches(checkpoint: Mapping[str, Any], module: L.LightningModule, path: str | Path | None) -> None:
    """Raise :class:`CheckpointMismatchError`, naming ``path``, unless the checkpoint's weights fit ``module``."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping) or not saved:
        return  # a sharded checkpoint's weights are loaded (and checked) by its strategy
    problems = state_dict_mismatch(saved, module.state_dict(), strict=module.strict_loading)
    if problems:
        ours = getattr(getattr(module, "policy_config", None), "path", None)
        raise CheckpointMismatchError(
            f"checkpoint {path!r} does not belong to this model ({type(module).__name__} on policy.path={ours!r}; "
            f"the checkpoint was trained from policy.path={checkpoint_policy_path(checkpoint)!r}): "
            + "; ".join(problems)
        )


# ----------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are write-fsync-rename in the target's own directory,
    whose failures say that the previous checkpoint is intact, and whose loads are weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        target = Path(path)
        partial = target.with_name(f".{target.name}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException as error:
            partial.unlink(missing_ok=True)
            if not isinstance(error, Exception):
                raise  # KeyboardInterrupt, SystemExit: the target is untouched, let them through
            before = "the previous checkpoint there is intact" if target.exists() else "no file was created there"
            raise CheckpointWriteError(
                f"could not write checkpoint {str(target)!r} ({type(error).__name__}: {error}); {before}. Free disk "
                "space or fix the directory's permissions, then continue with `--ckpt_path last`"
            ) from error
        _fsync_dir(target.parent)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False or not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location)


# ----------------------------------------------------------------------------- per-rank state
def gather_per_rank(value: Any, world_size: int) -> list[Any]:
    """``value`` of every rank, in rank order (one ``all_gather_object``; every rank must call it)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def own_rank_entry(per_rank: list[Any], rank: int, world_size: int, what: str) -> Any | None:
    """This rank's entry of a per-rank list from a checkpoint (None if it has none), warning when the
    checkpoint was written by another number of ranks: the continuation is then not exact."""
    if len(per_rank) != world_size:
        rank_zero_warn(
            f"the checkpoint holds {what} of {len(per_rank)} rank(s) but this run has {world_size}: ranks without "
            "an entry start afresh, so the run does not continue exactly as an uninterrupted one would"
        )
    return per_rank[rank] if rank < len(per_rank) else None


def rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states, as tensors and plain types (weights-only safe)."""
    legacy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # legacy=True: a tuple
    name, keys, pos, has_gauss, cached = legacy_state
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def reseed_global_rngs(*parts: object) -> None:
    """Seed torch (all devices), Python and NumPy from a stable hash of ``parts``."""
    seed = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_lightning_special_path(ckpt_path: str) -> bool:
    """``last``, ``best``, ``hpc`` or a model-registry reference: resolved by Lightning, not a file name."""
    return ckpt_path in _SPECIAL_CKPT_PATHS or ckpt_path.startswith("registry")
