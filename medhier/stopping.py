"""Stopping like a service: SIGTERM (a scheduler, ``kill``) and SIGINT (Ctrl-C) end a command
cleanly instead of killing it where it stands.

    signal ─▶ handler (main thread) raises Stopped ─▶ the library call it lands in notes what it
    had committed ─▶ ``medhier`` prints one line (that, and the command that continues), shuts Ray
    down, exits 128 + signal: 143 for SIGTERM, 130 for SIGINT

:class:`Stopped` is a ``BaseException`` (as ``KeyboardInterrupt`` is), so ``except Exception``
blocks let it through. Ray installs its own SIGTERM handling when it starts (a Python handler
that exits, and a C++ one that prints a stack trace and aborts): :func:`install` is called
again after ``ray.init`` so that medhier's stays in force. A second signal during the clean-up
is ignored (a scheduler's SIGKILL still ends the process). Work that should not be cut in two
(a commit, a few file writes) runs inside :func:`deferred`: a signal there waits until it ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "Stopped", "deferred", "install", "installed", "uninstall"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived. ``committed``: what the interrupted work had made durable (the
    innermost library call that knows says it, see :meth:`note`)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.committed = ""
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum

    def note(self, committed: str) -> None:
        """Say what was committed, unless a call deeper down, which knows better, already did."""
        if not self.committed:
            self.committed = committed


_installed = False
_defer_depth = 0
_pending: list[int] = []
_stopping = False


def _handler(signum: int, frame) -> None:
    global _stopping
    if _stopping:
        return  # already stopping: let the clean-up finish
    if _defer_depth:
        _pending.append(signum)
        return
    _stopping = True
    raise Stopped(signum)


def install() -> None:
    """Route SIGTERM and SIGINT to :class:`Stopped` in the main thread (a no-op elsewhere:
    Python only lets the main thread set handlers). Call again after anything that sets its
    own handlers (``ray.init``)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    _installed = True


def installed() -> bool:
    """Whether :func:`install` is in force (``runtime.init_ray`` re-installs it after Ray's)."""
    return _installed


def uninstall() -> None:
    """Back to Python's defaults (a library caller's own process after ``medhier.cli.main``)."""
    global _installed, _stopping
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _installed, _stopping = False, False
    _pending.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal until the block ends, then raise it: for work that a stop should not
    cut in two. Nesting is allowed; only the outermost block raises."""
    global _defer_depth, _stopping
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if not _defer_depth and _pending and not _stopping:
            signum = _pending.pop(0)
            _pending.clear()
            _stopping = True
            raise Stopped(signum)
