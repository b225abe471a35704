"""What a person at the terminal reads: rounded numbers, durations, and Ray's own noise kept off
the screen unless ``--verbose``.

A normal run of Ray prints lines that a newcomer reads as failures although nothing failed:
error-level lines from Ray's C++ core (``core_worker.cc … has constructor arguments in the
object store``, Ray issue 53727: Ray Data and Ray Train pass every actor its arguments by
reference, so every such actor triggers it), deprecation warnings from inside Ray, notes on
how Ray deduplicates logs, Ray Data's "execution finished" lines from inside training workers,
matplotlib's font cache. :func:`hide_ray_noise` drops exactly those lines (:data:`NOISE`, a
table of patterns with the reason each is harmless) from this process's stdout and stderr at
the file-descriptor level, where both Ray's forwarded worker lines and its C++ logging arrive;
every other line, warnings and errors included, passes unchanged and at once (progress bars
too: ``\\r`` ends a piece like a newline does).
"""

from __future__ import annotations

import atexit
import math
import os
import re
import select
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["NOISE", "Noise", "duration", "hide_ray_noise", "is_noise", "number", "restore_output"]


@dataclass(frozen=True)
class Noise:
    """One kind of line a normal run prints that says nothing is wrong."""

    pattern: str  # a regular expression searched in the line
    why: str  # why hiding it loses nothing
    then: int = 0  # lines after it from the same process that belong to it (a warning's source line)


NOISE: tuple[Noise, ...] = (
    Noise(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
          "Ray Data and Ray Train pass actors their arguments by reference; a restarted actor refetches them (Ray issue 53727)"),
    Noise(r"Ray deduplicates logs by default", "a note on Ray's log folding, printed whenever two workers log the same line"),
    Noise(r"^(\x1b\[\d+m)?\(\w+ pid=\d+[^)]*\)(\x1b\[0m)? \S+\.py:\d+: \w*DeprecationWarning: ",
          "a deprecation inside Ray or a library, not in medhier's calls", then=1),
    Noise(r"^\S+\.py:\d+: \w*DeprecationWarning: ", "a deprecation inside Ray or a library, not in medhier's calls", then=1),
    Noise(r"Progress bars disabled\. To enable, set", "medhier turns Ray Data's bars off inside training (epoch lines replace them)"),
    Noise(r"Dataset \S+ execution finished in [\d.]+ seconds", "Ray Data's per-pass note from inside training workers"),
    Noise(r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
          "Ray Train's cleaner releasing the resources of a training that ended (its controller exits with it)"),
    Noise(r"PYTHON worker processes have been started on node: .* maximum expected startup concurrency",
          "a search's trial drivers reserve 0.1 CPU each (they mostly wait), so Ray starts more workers than cores"),
    Noise(r"\[mutex\.cc : \d+\] RAW: (Lock|Unlock)", "absl's lock tracing, printed by a Ray actor as it exits"),
    Noise(r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor NIL_ID",
          "Ray's GCS, shutting down after a stop, tries to kill an actor that was never scheduled (a placeholder id)"),
    Noise(r"generated new fontManager", "matplotlib built its font cache (once per machine)"),
    Noise(r"Matplotlib is building the font cache", "matplotlib building its font cache (once per machine)"),
)
_PATTERNS = tuple(re.compile(n.pattern) for n in NOISE)
_ANY_NOISE = re.compile("|".join(f"(?:{n.pattern})" for n in NOISE))
_END = b"\x00medhier-console-end\x00"  # written by close(): the reader has caught up when it sees it
_PREFIX = re.compile(r"^(\x1b\[\d+m)?(\(\w+ pid=\d+[^)]*\))")


def is_noise(line: str) -> bool:
    """Whether ``line`` (one line of output) is one of :data:`NOISE`."""
    return bool(_ANY_NOISE.search(line))


def number(value: float | int | None, digits: int = 3) -> str:
    """A number as a person reads it: ``digits`` significant digits (0.9550125313283206 ->
    0.955, 1234.5 -> 1,234), ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def duration(seconds: float) -> str:
    """Seconds as ``42 s``, ``3 min 05 s`` or ``2 h 03 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class _FdFilter:
    """Output written to ``fd`` goes through a pipe; a thread forwards it to the original
    destination, less the lines of :data:`NOISE`."""

    def __init__(self, fd: int):
        self.fd = fd
        self.original = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.read = read
        self.done = threading.Event()
        self.skip: dict[str, int] = {}  # process prefix -> lines still to drop after a dropped warning
        self.thread = threading.Thread(target=self._pump, name=f"medhier-console-{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self.read], [], [], 0.2)
            if not ready:
                if pending:  # a prompt or a progress bar without its end yet: show it now
                    self._write([pending])
                    pending = b""
                continue
            chunk = os.read(self.read, 65536)
            if not chunk:
                break
            pending += chunk
            if _END in pending:  # everything written before close() has been read
                before, _, pending = pending.partition(_END)
                self._write(re.split(rb"(?<=[\r\n])", before))
                self.done.set()
            pieces = re.split(rb"(?<=[\r\n])", pending)
            pending = pieces.pop()
            self._write(pieces)
        if pending:
            self._write([pending])
        self.done.set()

    def _write(self, pieces: Iterable[bytes]) -> None:
        out = [p for p in pieces if p and not self._drop(p.decode("utf-8", "replace"))]
        if out:
            try:
                os.write(self.original, b"".join(out))
            except OSError:  # the terminal went away: nothing left to show
                pass

    def _drop(self, line: str) -> bool:
        prefix = m.group(2) if (m := _PREFIX.match(line)) else ""
        if self.skip.get(prefix):
            self.skip[prefix] -= 1
            return True
        for noise, pattern in zip(NOISE, _PATTERNS):
            if pattern.search(line):
                if noise.then:
                    self.skip[prefix] = noise.then
                return True
        return False

    def close(self) -> None:
        """Give ``fd`` back once what was written to it so far is through. The thread goes on
        forwarding what a child process that inherited the pipe may still write."""
        os.write(self.fd, _END)
        os.dup2(self.original, self.fd)
        self.done.wait(2.0)


_FILTERS: list[_FdFilter] = []


def hide_ray_noise() -> None:
    """Filter :data:`NOISE` out of this process's stdout and stderr from now on (idempotent;
    undone by :func:`restore_output` and at exit). Ray's processes started after this inherit
    the filtered descriptors, so their direct output is filtered too."""
    if _FILTERS:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a captured or replaced stream (pytest, a notebook)
            continue
        _FILTERS.append(_FdFilter(fd))
    atexit.register(restore_output)


def restore_output() -> None:
    """Stop filtering: flush what is pending and give the descriptors back."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    while _FILTERS:
        _FILTERS.pop().close()
