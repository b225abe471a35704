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

    for i in range(3):
        pq.write_table(pa.table({"x": list(range(i * 4, i * 4 + 4))}), tmp_path / f"part-{i}.parquet")

    def footer_readers() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "FooterReader")], limit=10000, raise_on_missing_output=False)}

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
