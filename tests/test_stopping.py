"""Stopping like a service: a stop signal becomes Stopped, work in a deferred block finishes
first, and a command stopped for real prints one line and exits 128 + the signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from medhier import stopping
from medhier.stopping import Stopped
from tests.processes import descendants, gone_after, medhier, stop, wait_until


@pytest.fixture()
def installed():
    stopping.install()
    yield
    stopping.uninstall()


@pytest.mark.parametrize("signum,name,code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)])
def test_a_stop_signal_raises_stopped_with_the_shells_exit_code(installed, signum, name, code):
    with pytest.raises(Stopped) as info:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes of the main thread
            pass
    assert (info.value.name, info.value.exit_code) == (name, code)


def test_a_deferred_block_finishes_before_the_stop_and_the_innermost_note_wins(installed):
    done = []
    with pytest.raises(Stopped) as info:
        try:
            with stopping.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for step in range(3):
                    done.append(step)
        except Stopped as stop_:
            stop_.note("the inner call knows what it committed")
            stop_.note("an outer call's note comes second")
            raise
    assert done == [0, 1, 2]
    assert info.value.committed == "the inner call knows what it committed"


def test_a_second_signal_during_the_clean_up_is_ignored(installed):
    with pytest.raises(Stopped):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first stop unwinds
            for _ in range(1000):
                pass


def test_ctrl_c_stops_synth_with_one_line_and_status_130(tmp_path):
    """A command without Ray: the line names what is on disk and the command that continues."""
    out = tmp_path / "archive"
    process = medhier("synth", "--out", str(out), "--n", "2000", "--size", "256")
    wait_until(lambda: any(out.rglob("*.dcm")), timeout=120, what="the first phantom file")
    children = descendants(process.pid)
    code, stdout, stderr = stop(process, signal.SIGINT)
    assert code == 130
    assert stderr.strip().splitlines() == [
        f"medhier synth: stopped by SIGINT. Committed: part of the archive at {out} (a re-run writes it again). "
        f"To continue, re-run: medhier synth --out {out} --n 2000 --size 256"]
    assert "Traceback" not in stdout + stderr
    assert not gone_after(children)
    assert 0 < len(list(Path(out).rglob("*.dcm"))) < 2000
