"""runtime.cpu_threads: Ray's logical CPUs become threads, never more than the process's cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medhier.runtime import cpu_threads, default_local_cpus


@pytest.mark.parametrize("requested", [1, 2, 7, 64])
def test_threads_never_exceed_the_cores_this_process_may_use(requested):
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(requested) == min(requested, cores)


@pytest.mark.parametrize("requested", [0, 0.5])
def test_a_fraction_of_a_cpu_still_gets_one_thread(requested):
    assert cpu_threads(requested) == 1


def test_a_local_ray_has_more_logical_cpus_than_threads_are_given():
    # The case the cap exists for: a model actor holding all but one of a local Ray's CPUs.
    assert cpu_threads(default_local_cpus() - 1) <= len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call")
def test_a_process_pinned_to_one_core_gets_one_thread():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from medhier.runtime import cpu_threads; print(cpu_threads(8))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert out.stdout.strip() == "1"


@pytest.mark.ray
def test_reading_a_cache_starts_no_footer_reader_processes(ray_session, tmp_path):
    """Ray 2.60's default Parquet reader starts 32 footer-reader actors per read; medhier's
    reads go through the V1 reader instead (medhier.runtime.use_v1_parquet_reader), which reads
    footers without starting a process."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from ray.util.state import list_actors

    from tests.conftest import session_ray_address

    for i in range(3):
        pq.write_table(pa.table({"x": list(range(i * 4, i * 4 + 4))}), tmp_path / f"part-{i}.parquet")

    def footer_readers() -> set[str]:
        return {a.actor_id for a in list_actors(address=session_ray_address(), filters=[("class_name", "=", "FooterReader")], limit=10000,
                                                raise_on_missing_output=False)}

    before = footer_readers()
    assert sorted(r["x"] for r in ray.data.read_parquet(str(tmp_path)).take_all()) == list(range(12))
    assert footer_readers() == before


def test_a_users_choice_of_parquet_reader_is_kept(monkeypatch):
    from ray.data import DataContext

    from medhier.runtime import use_v1_parquet_reader

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    use_v1_parquet_reader()
    assert ctx.use_datasource_v2 is True
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2")
    use_v1_parquet_reader()
    assert ctx.use_datasource_v2 is False


def _disk_line(node_time: str) -> str:
    """The raylet's line, as its log monitor forwards it (Ray 2.60)."""
    return (f"[2026-12-01 {node_time},804 E 32467 32481] (raylet) file_system_monitor.cc:116: /tmp/ray/session_2026-12-01_22-14-11_307787_32173"
            " is over 95% full, available space: 6.3003 GB; capacity: 251.972 GB. Object creation will fail if spilling is required.")


def test_the_raylets_disk_full_line_becomes_one_warning_per_node_and_other_lines_pass(caplog):
    from medhier.runtime import RayDiskWarnings

    printed: list[dict] = []
    printer = RayDiskWarnings(printed.append)
    other = "[2026-12-01 22:14:30,001 E 32467 32481] (raylet) node_manager.cc:1: worker killed: out of memory"
    with caplog.at_level("WARNING", logger="medhier.runtime"):
        printer({"pid": "raylet", "ip": "10.0.0.1", "lines": [_disk_line("22:14:24")]})
        printer({"pid": "raylet", "ip": "10.0.0.1", "lines": [_disk_line("22:14:34"), other]})
        printer({"pid": "raylet", "ip": "10.0.0.2", "lines": [_disk_line("22:14:35")]})
        printer({"pid": 4242, "ip": "10.0.0.1", "lines": ["a worker's own line: file_system_monitor.cc:116: x is over 95% full,"
                                                           " available space: 1 GB; capacity: 2 GB"]})
    # Ray's other lines, and any worker's, are printed as they came; the disk line never is
    assert [d["lines"] for d in printed] == [[other], ["a worker's own line: file_system_monitor.cc:116: x is over 95% full,"
                                                       " available space: 1 GB; capacity: 2 GB"]]
    warnings = [r.getMessage() for r in caplog.records if r.name == "medhier.runtime"]
    assert warnings == [
        f"Ray's session directory /tmp/ray/session_2026-12-01_22-14-11_307787_32173 on node {node} is on a disk over 95% full "
        "(6.3 GB free of 252 GB): Ray cannot spill objects there, and a run whose objects outgrow memory fails. Free space on "
        "that disk, or give Ray a temporary directory on a larger one (RAY_TMPDIR for a local instance, `ray start --temp-dir` "
        "on a cluster). Ray repeats this every 10 s; medhier says it once per node."
        for node in ("10.0.0.1", "10.0.0.2")]


@pytest.mark.ray
def test_the_drivers_printer_of_rays_logs_is_wrapped_once(ray_session):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from medhier.config import RuntimeConfig
    from medhier.runtime import RayDiskWarnings, init_ray

    init_ray(RuntimeConfig(local_num_cpus=8, progress=False))  # a second call: joins, wraps nothing twice
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    assert len(printers) == 1 and isinstance(printers[0], RayDiskWarnings)
    assert not isinstance(printers[0].print_logs, RayDiskWarnings)
