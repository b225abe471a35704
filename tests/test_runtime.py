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
