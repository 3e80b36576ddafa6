"""One error type for mistakes in what the user gave us (a path, a key, a file, a setting).

A :class:`UserError` is printed by the command-line entry points as one paragraph, without a
traceback, and the process exits with status 2 (bad input, as ``argparse`` does). Set
``SPIRAL_LIT_DEBUG=1`` to see the traceback as well. Anything else is a bug or an environment
failure and keeps its traceback.

The message says what is wrong, where (file, row, key), what was expected, and how to fix it.
It subclasses ``ValueError`` so that code and tests that catch ``ValueError`` keep working.

Every entry point runs its ``main`` through :func:`run_main`::

    if __name__ == "__main__":
        run_main(main)
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEBUG_ENV = "SPIRAL_LIT_DEBUG"
"""Environment variable: set to ``1`` to print the traceback of a :class:`UserError` too."""

EXIT_BAD_INPUT = 2
"""Exit status for bad input, as ``argparse`` uses for a bad command line."""


class UserError(ValueError):
    """Bad input from the user: printed without a traceback by the CLI, exit status 2."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A path the user gave does not exist; also a ``FileNotFoundError``, so callers that catch that keep working."""


def find_user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or one a library re-raised as its own error.

    jsonargparse instantiates the config's classes and dataclasses and wraps whatever their ``__init__`` or
    ``__post_init__`` raises into a ``ValueError`` ("Does not validate against any of the Union subtypes ...")
    chained with ``raise ... from``; the user's message is at the end of that chain.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def debug_enabled() -> bool:
    """Whether ``SPIRAL_LIT_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def report_user_error(error: UserError, traceback_of: BaseException | None = None) -> None:
    """Print ``error`` on stderr as ``error: <message>``; with ``SPIRAL_LIT_DEBUG=1``, the traceback first."""
    if debug_enabled():
        traceback.print_exception(traceback_of or error, file=sys.stderr)
    print(f"error: {str(error).strip()}", file=sys.stderr, flush=True)


def run_main(main: Callable[[], T]) -> T:
    """Call ``main()``; a :class:`UserError` (also one wrapped by a library) is printed and exits with status 2."""
    try:
        return main()
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        report_user_error(user_error, traceback_of=error)
        raise SystemExit(EXIT_BAD_INPUT) from None
