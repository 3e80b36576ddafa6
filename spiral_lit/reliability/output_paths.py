"""Output locations that never destroy what spiral_lit did not write, and writes that land whole or not at all.

Every writer (``predict``'s JSONL, ``python -m spiral_lit export``, the ``HFExport`` callback,
``python -m spiral_lit compare --out``) calls :func:`check_output` before any expensive work, and writes
through :func:`atomic_dir` or :func:`partial_file` / :func:`commit_file`.

**What may be replaced without asking.** A location that does not exist, an empty directory, an empty file,
or an output spiral_lit wrote itself and nobody changed since: re-running a command into its own previous
output just works, as Lightning's ``last.ckpt`` and ``save_pretrained`` users expect. Anything else (a file
the user wrote, a run directory, a directory with an extra file in it) is refused with a
:class:`~spiral_lit.errors.UserError` naming the path, what is there, and the flag that allows replacing
it (``--overwrite`` on the command lines, ``overwrite: true`` on the callbacks), like Hugging Face's
``overwrite_output_dir``.

**How our own outputs are recognised.** A directory we write holds a marker, ``.spiral_lit_output.json``,
listing every file we put there with its size; a file we write has a marker beside it,
``.<name>.spiral_lit_output.json``. An output counts as ours only while its files are exactly the listed
ones with the listed sizes, so a file added to (or edited in) an export directory makes it the user's.

**Never, even with the flag:** an output equal to, or a directory containing, an input of the command (the
predict file, the checkpoint, the config, the model directory) or the current run's own directories (log
directory, checkpoint directory).

**Atomic writes.** A directory is written as a sibling ``<dir>.tmp-XXXXXXXX`` and renamed into place (the
old one renamed aside first and deleted after); a file is written as a hidden sibling
``.<name>.partial-XXXXXXXX`` and moved over the target with ``os.replace``, as checkpoints are
(:mod:`spiral_lit.reliability.checkpointing`). A crash leaves either the previous output or the new one, never half of
it.

:func:`run_directories` names a Lightning run's own directories, which the callbacks' outputs must not replace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from spiral_lit.errors import UserError

MARKER = ".spiral_lit_output.json"
"""Inside a directory spiral_lit wrote: ``{"files": {relative path: size in bytes}}``."""


def file_marker(path: Path) -> Path:
    """The marker beside a file spiral_lit wrote."""
    return path.with_name(f".{path.name}{MARKER}")


def _listing(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file below ``directory`` (the marker itself excluded)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() or path.is_symlink():
            files[path.relative_to(directory).as_posix()] = path.lstat().st_size
    files.pop(MARKER, None)
    return files


def _read_marker(marker: Path) -> dict[str, int] | None:
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is an output spiral_lit wrote and nobody changed since (module docstring)."""
    if path.is_dir() and not path.is_symlink():
        return _read_marker(path / MARKER) == _listing(path)
    if path.is_file():
        return _read_marker(file_marker(path)) == {path.name: path.stat().st_size}
    return False


def _write_marker(marker: Path, files: dict[str, int]) -> None:
    marker.write_text(json.dumps({"written_by": "spiral_lit", "files": files}, indent=1))


def _describe(path: Path) -> str:
    """What is at ``path``, for an error message: a few names and how many there are."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if not path.is_dir():
        return f"a file of {path.lstat().st_size} bytes"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    path: str | Path,
    *,
    what: str,
    flag: str,
    overwrite: bool = False,
    is_dir: bool = True,
    protected: Iterable[tuple[str, str | Path | None]] = (),
) -> Path:
    """Refuse ``path`` as the output ``what`` unless writing there destroys nothing the user has (module docstring).

    Args:
        path: The output directory (``is_dir``) or file.
        what: How the message names the output, e.g. ``"--out"`` or ``"HFExport's dirpath"``.
        flag: How the user allows replacing what is there, e.g. ``"--overwrite"``.
        overwrite: The user asked to replace what is there (never an input or the run's own directory).
        protected: ``(description, path)`` of the command's inputs and the run's directories; None is skipped.

    Returns the resolved path.
    """
    out = Path(path).expanduser().resolve()
    for description, other in protected:
        if other is None:
            continue
        guarded = Path(other).expanduser().resolve()
        if _is_within(guarded, out):
            where = "is" if guarded == out else f"contains {guarded}, which is"
            raise UserError(
                f"{what} {str(path)!r} {where} {description}: writing there would destroy it. Choose an output "
                f"location outside it ({flag} does not change this)"
            )
    if not is_dir and out.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory; give the path of a file to write")
    if not (out.exists() or out.is_symlink()) or overwrite or written_by_us(out):
        return out
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return out
    if out.is_file() and not out.is_symlink() and out.stat().st_size == 0:
        return out
    raise UserError(
        f"{what} {str(path)!r} already holds {_describe(out)} that spiral_lit did not write (or that changed since); "
        f"writing there would replace it. Choose a new location, or pass {flag} to replace it"
    )


def _unique_sibling(path: Path, label: str) -> Path:
    return path.with_name(f"{path.name}.{label}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(
    path: str | Path,
    *,
    what: str,
    flag: str,
    overwrite: bool = False,
    protected: Iterable[tuple[str, str | Path | None]] = (),
) -> Iterator[Path]:
    """Yield a fresh sibling directory to write into; on success mark it ours and swap it in for ``path``.

    ``path`` is checked (:func:`check_output`, same arguments) before and again just before the swap: a long
    run may have given someone time to put files there.
    """
    protected = list(protected)
    out = check_output(path, what=what, flag=flag, overwrite=overwrite, protected=protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(out, "tmp")
    tmp.mkdir()  # os.mkdir applies the umask, so the final directory gets the usual permissions
    try:
        yield tmp
        _write_marker(tmp / MARKER, _listing(tmp))
        check_output(path, what=what, flag=flag, overwrite=overwrite, protected=protected)
        if out.exists() or out.is_symlink():
            old = _unique_sibling(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)  # nothing left when the swap happened; the partial output otherwise


def partial_file(path: str | Path) -> Path:
    """A hidden sibling of ``path`` to write into before :func:`commit_file` moves it into place."""
    out = Path(path)
    return out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")


def commit_file(partial: Path, path: str | Path) -> Path:
    """Move a finished ``partial`` over ``path`` (fsynced, atomic) and mark the result as ours."""
    out = Path(path)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, out)
    _write_marker(file_marker(out), {out.name: out.stat().st_size})
    return out


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """Where the run's ``ModelCheckpoint`` callbacks write, resolved as Lightning does before they are set up
    (``ModelCheckpoint.__resolve_ckpt_dir``: their ``dirpath``, else ``<first logger's dir>/checkpoints``)."""
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            dirs.append(Path(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            dirs.append(Path(save_dir, str(logger.name), version, "checkpoints"))
        else:
            dirs.append(Path(trainer.default_root_dir, "checkpoints"))
    return dirs


def run_directories(trainer: L.Trainer) -> list[tuple[str, str | Path | None]]:
    """The current run's own directories: no output may replace them (every rank must call this)."""
    own: list[tuple[str, str | Path | None]] = [("the run's log directory", trainer.log_dir)]  # a broadcast
    return own + [("the run's checkpoint directory", d) for d in checkpoint_dirs(trainer)]
