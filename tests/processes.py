"""Real subprocesses of ``medhier`` for the stopping and console tests: start one, read its
process table (from /proc: the process and everything it started), send it a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def medhier(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``medhier ARGS`` as a user runs it (``python -m medhier.cli``), its own session, output piped."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # the test session's settings are not a user's: Ray folds repeated lines by default
    environ.pop("RAY_DEDUP_LOGS", None)
    return subprocess.Popen([sys.executable, "-m", "medhier.cli", *args], cwd=ROOT, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> dict[int, str]:
    """Every live process started by ``pid``, at any depth -> {pid: command line}."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))):
            parents[int(entry.name)] = stat[0]
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
                except (FileNotFoundError, ProcessLookupError):
                    continue
                frontier.append(child)
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    """Those of ``pids`` still running (a zombie has ended)."""
    return {p: cmd for p, cmd in pids.items() if (stat := _stat(p)) and stat[1] != "Z"}


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, str, str]:
    """Send ``signum`` to the process alone (as a scheduler does) -> (exit status, stdout, stderr)."""
    process.send_signal(signum)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_until(predicate, timeout: float, every: float = 0.2, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(every)


def gone_after(pids: dict[int, str], timeout: float = 30) -> dict[int, str]:
    """Wait up to ``timeout`` for ``pids`` to end -> those still running."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)
