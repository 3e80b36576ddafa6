"""Test-only tasks whose scorers behave like code that a hostile answer got to run.

Kept in a light module: verifier workers unpickle the task and import its module.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import struct
import subprocess

from spiral_lit.tasks.base import Problem, Split, Task

MARKER_ENV = "SPIRAL_LIT_HOSTILE_TARGET"
"""Where the hostile scorers try to leave a file (an absolute path, given in the problem's answer)."""


class HostileTask(Task):
    """``score`` does what the extracted answer names, against the path in ``problem.answer``."""

    name = "hostile"

    def num_problems(self, split: Split) -> int | None:
        return None

    def problem(self, index: int, split: Split) -> Problem:
        return Problem(uid=f"hostile/{split}/{index}", question="?", answer="")

    def score(self, extracted_answer: str, problem: Problem) -> float:
        target = problem.answer
        if extracted_answer == "system":
            os.system(f"touch {target}")
        elif extracted_answer == "subprocess":
            subprocess.run(["touch", target], check=False)
        elif extracted_answer == "write":
            with open(target, "w") as f:
                f.write("pwned")
        elif extracted_answer == "delete":
            os.remove(target)
        elif extracted_answer == "socket":
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        elif extracted_answer == "pickle_to_parent":
            _send_pickle_bomb_to_parent(target)
        elif extracted_answer == "confined":
            return float(_is_confined())
        return 1.0


class _TouchOnUnpickle:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.target}",)


def _send_pickle_bomb_to_parent(target: str) -> None:
    """Write, framed as a multiprocessing message, a pickle that runs a command when the parent loads it."""
    payload = pickle.dumps(_TouchOnUnpickle(target))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.write(fd, struct.pack("!i", len(payload)) + payload)


def _is_confined() -> bool:
    """The worker's environment, directory and descriptors are what the sandbox promises."""
    from spiral_lit.tasks.sandbox import ENVIRONMENT_KEPT

    scratch = os.getcwd()
    env_ok = set(os.environ) <= {*ENVIRONMENT_KEPT, "HOME", "TMPDIR"} and os.environ.get("HOME") == scratch
    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    # stdin, stdout, stderr, the pipe to the parent, and the descriptor listdir used (closed by now, maybe listed)
    return env_ok and os.environ.get("TMPDIR") == scratch and os.listdir(scratch) == [] and len(fds - {0, 1, 2}) <= 2
