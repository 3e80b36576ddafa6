"""Least privilege for verifier workers: a scorer reads model output, which is hostile input.

The answer grammars (:mod:`spiral_lit.tasks.answer_guard`) keep answers away from scorers that
would run them; this is the second, independent layer, for scorers we do not know to be unsafe
(a user's own task, a new release of a library). :func:`harden` runs first in each worker:

- file descriptors: only stdin/stdout/stderr and the pipe to the trainer stay open;
- working directory, ``HOME`` and ``TMPDIR``: an empty scratch directory;
- environment: an allow-list of locale and thread settings (no tokens or credentials);
- resource limits: address space (``memory_limit_mb``), no core files, no child processes (for
  non-root users);
- a Python audit hook that refuses, from then on, creating processes, writing, deleting or renaming
  files, opening sockets, loading native code (``ctypes``), signalling other processes, reading
  other processes' environment or memory, and raising resource limits.

An audit hook is not a security boundary against native code, only against Python-level
effects; the worker also sends its results as JSON (never pickle), so even a worker taken over
cannot make the trainer run code by what it sends.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
from collections.abc import Iterable
from typing import Any

ENVIRONMENT_KEPT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables a worker keeps; everything else (tokens, credentials, proxies) is dropped."""

_REFUSED_EVENTS = frozenset(
    {
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.truncate",
        "os.chmod", "os.chown", "os.chflags", "os.utime", "os.setxattr", "os.removexattr",
        "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "pty.spawn",
        "webbrowser.open", "urllib.Request", "http.client.connect",
    }
)  # fmt: skip
_REFUSED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "socket.", "ctypes.", "shutil.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PRIVATE_PROC_FILE = re.compile(r"^/proc/[^/]+/(?:task/[^/]+/)?(?:environ|mem)$")


class SandboxViolation(PermissionError):
    """A scorer tried something a verifier worker may not do; the item scores 0 as an error."""


def harden(scratch_dir: str, keep_fds: Iterable[int], memory_limit_mb: int) -> None:
    """Drop what this process does not need to score answers (irreversible: call it in a worker only)."""
    _close_fds_except({0, 1, 2, *keep_fds})
    os.chdir(scratch_dir)
    kept = {name: os.environ[name] for name in ENVIRONMENT_KEPT if name in os.environ}
    os.environ.clear()
    os.environ.update(kept, HOME=scratch_dir, TMPDIR=scratch_dir)
    _limit_resources(memory_limit_mb)
    sys.dont_write_bytecode = True
    # Importing ctypes loads the interpreter's own symbols (a ``ctypes.dlopen`` event). sympy imports it, lazily, on
    # a scorer's first call; importing it now keeps that harmless load from being refused later.
    import ctypes  # noqa: F401

    sys.addaudithook(_refuse_side_effects)


def _close_fds_except(keep: set[int]) -> None:
    """Close every inherited descriptor not in ``keep`` (the fork server's sockets and pipes among them)."""
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):  # the descriptor listdir used is already closed
                os.close(fd)


def _limit_resources(memory_limit_mb: int) -> None:
    """Hard limits, so that a scorer cannot raise them again (the audit hook refuses it anyway)."""
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # No RLIMIT_FSIZE: it would also stop writes to stdout/stderr when a cluster job sends them to a log file.
    # Opening files for writing is refused by the audit hook instead.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; the audit hook still refuses fork and exec
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _refuse_side_effects(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: raise on any event a scorer has no business causing."""
    if event in _REFUSED_EVENTS or event.startswith(_REFUSED_PREFIXES):
        raise SandboxViolation(f"verifier sandbox: {event} is not allowed while scoring")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes:
            raise SandboxViolation(f"verifier sandbox: opening {path!r} for writing is not allowed while scoring")
        if isinstance(path, str) and _PRIVATE_PROC_FILE.match(path):
            raise SandboxViolation(f"verifier sandbox: reading {path!r} is not allowed while scoring")
