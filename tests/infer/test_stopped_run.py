"""``medhier score`` stopped by SIGTERM and run again, as a user (or a scheduler) runs it: two
processes with their own Ray, no test-session Ray (so this module runs beside the session's Ray
tests: tests/conftest.py, _scope)."""

from __future__ import annotations

import json
import re
import signal
from collections import Counter

import pyarrow.parquet as pq
import pytest

from medhier import columns as C
from medhier.infer.batch import report_table
from medhier.synthetic import spine as synthetic
from tests.infer.test_batch import SMOKE, _listed, _make_checkpoint, _rows_per_file
from tests.processes import descendants, gone_after, medhier, stop, wait_until

pytestmark = pytest.mark.slow


def test_a_killed_run_loses_only_the_files_in_flight_and_the_next_one_adopts_the_rest(tmp_path):
    """``medhier score`` over 120 files, stopped with SIGTERM once about half of them are
    staged: one line, status 143, no Ray process left; the same command again adopts what was
    staged and scores only the rest, and the report has each object once."""
    total = 120
    root = str(tmp_path / "archive")
    synthetic.generate_archive(root, total, seed=3, size=32)
    checkpoint = _make_checkpoint(str(tmp_path / "ckpt"), 0, root)
    out = tmp_path / "out"
    args = ["score", "--archive", root, "--checkpoint", checkpoint, "--output", str(out), "--config", SMOKE, "runtime.progress=false",
            "score.batch_size=8", "data.decode_batch_size=8", "runtime.local_num_cpus=4"]
    process = medhier(*args)

    def staged_files() -> int:
        rows = 0
        for path in out.glob("runs/*/staging/*.parquet"):
            try:
                rows += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # still being written
                pass
        return rows

    def half_staged() -> bool:
        assert process.poll() is None, process.communicate()
        return staged_files() >= total // 2

    wait_until(half_staged, timeout=300, every=0.1, what="half of the archive to be staged")
    ray_processes = descendants(process.pid)
    code, stdout, stderr = stop(process, signal.SIGTERM)
    assert code == 143, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("medhier score: stopped by SIGTERM. Committed: nothing of run ")
    assert "the next run of this model adopts them" in line and f"re-run: medhier score --archive {root}" in line
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr
    assert not gone_after(ray_processes), "Ray processes outlived medhier score"
    staged = staged_files()
    assert not (out / "report").exists()
    noted = int(re.search(r"; ([\d,]+) scored rows are staged", line).group(1).replace(",", ""))
    assert total // 2 <= noted <= staged  # what the line says was there when it stopped

    again = medhier(*args)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adopted"] == staged and summary["adopted"] + summary["files"] == total  # every staged file adopted, none scored twice
    assert summary["files"] <= total * 0.5  # about half is left; the stop came once half was staged
    assert _rows_per_file(str(out)) == Counter({p: 1 for p in _listed(root)})
    assert set(report_table(str(out), columns=[C.RUN_ID])[C.RUN_ID].to_pylist()) == {summary["run_id"]}
    assert summary["removed_runs"] == summary["adopted_from"]  # the stopped run's folder goes once its rows are committed
