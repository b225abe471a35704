"""The console: numbers as a person reads them, and Ray's noise off the screen while every other
line, warnings included, still shows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from medhier.console import NOISE, duration, is_noise, number
from tests.processes import ROOT

# Lines a normal run printed (copied from `medhier train` and `medhier score` on Ray 2.60).
RAY_NOISE = [
    "[2026-12-01 13:20:25,030 E 27000 27000] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(ModelActor))' "
    "and ID: 'dc2b9b992a01a3986ae106d901000000' has constructor arguments in the object store and max_restarts > 0.",
    "\x1b[36m(TrainController pid=29766)\x1b[0m [2026-12-01 13:19:42,876 E 29766 29909] core_worker.cc:2465: Actor with class "
    "name: 'PreemptionWatcher' and ID: '783528fe' has constructor arguments in the object store and max_restarts > 0.",
    "\x1b[36m(DatasetManager pid=31329)\x1b[0m /x/ray/data/_internal/execution/interfaces/execution_options.py:436: "
    "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
    "\x1b[36m(SplitCoordinator pid=31871)\x1b[0m Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "\x1b[36m(RayTrainWorker pid=30937)\x1b[0m ✔️  Dataset val_03579T39_0 execution finished in 0.00 seconds",
    "\x1b[36m(RayTrainWorker pid=30937)\x1b[0m x\x1b[32m [repeated 2x across cluster] (Ray deduplicates logs by default. "
    "Set RAY_DEDUP_LOGS=0 to disable log deduplication)\x1b[0m",
    "\x1b[36m(RayTrainWorker pid=1)\x1b[0m matplotlib.font_manager INFO: generated new fontManager",
    "\x1b[36m(PlacementGroupCleaner pid=27981)\x1b[0m Detected that the Ray Train controller actor (e185adcb) is dead. "
    "Cleaning up placement group = [PlacementGroupID(738bcf7b)] created by this run.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 20 PYTHON worker processes have been started on node: a229ef with address: 192.0.2.2, "
    "which is 10x the maximum expected startup concurrency (2).",
    "\x1b[36m(PlacementGroupCleaner pid=8249)\x1b[0m [mutex.cc : 452] RAW: Lock blocking 0x55b427368310   @ 0x7fa09ac2b1a2",
    "\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-01 17:43:02,651 E 1258 1258] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill "
    "actor NIL_ID, return status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: RPC error: Socket closed rpc_code: 14",
]
# Lines that must still show.
MEANINGFUL = [
    "epoch 3 (4/12)  train loss 0.842  val leaf_macro_auc 0.713 (best)",
    "\x1b[36m(RayTrainWorker pid=30937)\x1b[0m medhier.train.loop WARNING: resuming from the checkpoint of epoch 2",
    "\x1b[36m(MapWorker pid=7)\x1b[0m RuntimeError: injected failure after 2 batches",
    "/work/medhier/x.py:12: UserWarning: score.precision=int8: none of the sampled objects decoded",
    "[2026-12-01 13:20:25,030 E 27000 27000] core_worker.cc:812: Failed to connect to the raylet",
    "medhier score: stopped by SIGTERM. Committed: nothing.",
]


@pytest.mark.parametrize("line", RAY_NOISE)
def test_ray_noise_of_a_normal_run_is_recognised(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", MEANINGFUL)
def test_warnings_errors_and_medhier_lines_are_not_noise(line):
    assert not is_noise(line)


def test_every_kind_of_noise_says_why_hiding_it_loses_nothing():
    assert all(n.why and len(n.why) > 20 for n in NOISE)


@pytest.mark.parametrize(
    "value,text",
    [(0.9550125313283206, "0.955"), (1234.5, "1,234"), (14.0, "14"), (3.7412, "3.74"), (0.00012345, "0.000123"),
     (None, "n/a"), (float("nan"), "n/a"), (250000, "250,000"), (0.0, "0")],
)
def test_numbers_are_rounded_to_three_significant_digits(value, text):
    assert number(value) == text


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (42.4, "42 s"), (185, "3 min 05 s"), (3725, "1 h 02 min")])
def test_durations_read_as_seconds_minutes_hours(seconds, text):
    assert duration(seconds) == text


def test_the_filter_drops_noise_from_this_process_its_children_and_its_c_level_writes_and_keeps_the_rest():
    """In a real process: noise written as Ray writes it (Python prints of forwarded worker lines,
    C++ writes straight to descriptor 2, a child process's output), a progress bar redrawn with
    carriage returns, and a deprecation with its source line; then the filter is removed."""
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from medhier import console
        noise, keep = {RAY_NOISE!r}, {MEANINGFUL!r}
        console.hide_ray_noise()
        for a, b in zip(noise, keep):
            print(a, file=sys.stderr, flush=True)
            os.write(1, (b + "\\n").encode())
        os.write(2, (noise[0] + "\\n").encode())
        subprocess.run([sys.executable, "-c", "import sys; print({RAY_NOISE[4]!r}, file=sys.stderr); print('child line')"])
        print("\\x1b[36m(W pid=3)\\x1b[0m /x/y.py:1: DeprecationWarning: old\\n\\x1b[36m(W pid=3)\\x1b[0m   old()", file=sys.stderr)
        sys.stderr.write("bar 10%\\r"); sys.stderr.flush(); time.sleep(0.5)
        sys.stderr.write("bar 100%\\n")
        console.restore_output()
        print("after: " + noise[3], file=sys.stderr)
    """)
    # bytes: text mode would turn the bar's carriage return into a newline
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().splitlines() == MEANINGFUL[:len(RAY_NOISE)] + ["child line"]
    assert out.stderr.decode() == "bar 10%\rbar 100%\nafter: " + RAY_NOISE[3] + "\n"
