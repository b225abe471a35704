"""Shared fixtures: one Ray instance per test session, one real S3 endpoint (moto's server on
127.0.0.1, real HTTP), and small phantom archives."""

from __future__ import annotations

import functools
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

# Before anything imports boto3/pyarrow or starts Ray (whose workers inherit the environment):
# fake credentials for the local S3 endpoint, and no instance-metadata lookups that would hang.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MEDHIER_PATIENT_SALT", "test-salt")
# Ray Train's controller polls its workers every 2 s, and each step of a run (workers started,
# training launched, finished) waits for the next poll; the tests' tiny runs need not.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The test PACS's bearer token (tests/orthanc.py), a fresh secret per session: Ray's workers
# inherit it, and tests check that it never reaches an output or a log. Nothing of the
# developer's own environment is used.
os.environ["MEDHIER_DICOMWEB_TOKEN"] = "medhier-test-" + uuid.uuid4().hex
for _name in ("MEDHIER_DICOMWEB_USER", "MEDHIER_DICOMWEB_PASSWORD", "MEDHIER_DICOMWEB_CA_BUNDLE",
              "MEDHIER_DICOMWEB_CLIENT_CERT", "MEDHIER_DICOMWEB_CLIENT_KEY"):
    os.environ.pop(_name, None)


ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _scope(module: str) -> str:
    """Where a test module runs when xdist spreads the suite over processes (pyproject's
    addopts: ``-n 2``; ``-n 0`` runs it all in this one): "cluster" for the two-node cluster's
    tests, "session" for every module with a test on the session's Ray (marker ``ray``, or the
    ``ray_session`` fixture), so that the instance and the trainings shared through session
    fixtures are made once, in one process; any other module is a scope of its own, run by
    whichever process is free. ``module``: its path from the repository root."""
    if module == "tests/test_cluster.py":
        return "cluster"
    text = (ROOT / module).read_text()
    return "session" if "pytest.mark.ray" in text or "ray_session" in text else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling  # only when xdist runs the session

    class ByRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid.split("::", 1)[0])

    return ByRay(config, log)


@pytest.fixture(autouse=True)
def _no_ray_outside_the_session_scope(request):
    """A test of a module outside the "session" scope (:func:`_scope`) must not start Ray:
    ``ray.data`` would start a second local instance in its process without a word."""
    module = request.node.nodeid.split("::", 1)[0]
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if _scope(module) == module and not before and ray is not None and ray.is_initialized():
        pytest.fail(f"{request.node.nodeid} started Ray: mark it `ray` (pytest.mark.ray) so that it runs beside the session's Ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto's threaded server), shared by the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket per test -> ``s3://<bucket>``."""
    import boto3

    name = f"medhier-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def storage_cfg(s3_endpoint):
    from medhier.config import StorageConfig

    return StorageConfig(s3_endpoint=s3_endpoint)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """One real PACS for the session: Orthanc with DICOMweb on 127.0.0.1 (tests/orthanc.py),
    stopped by its process id at the end. Tests keep to their own studies (their phantoms'
    UIDs differ by seed), through the archive URI's StudyInstanceUID filter."""
    from tests import orthanc as pacs  # imports requests; only sessions with PACS tests need it

    if not pacs.installed():
        pytest.skip(f"Orthanc is not installed ({pacs.ORTHANC}, {pacs.PLUGIN}): apt-get install -y orthanc orthanc-dicomweb")
    server = pacs.start(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (starting Ray takes ~15 s).

    More logical CPUs than cores: training workers take fractional CPUs and Ray Data keeps
    CPUs for its own tasks, so nothing waits forever on 2 cores.
    """
    from medhier.config import RuntimeConfig
    from medhier.runtime import init_ray, shutdown_ray

    init_ray(RuntimeConfig(local_num_cpus=8, progress=False))
    yield
    shutdown_ray()


def session_ray_address() -> str:
    """The session's Ray (GCS address) for Ray's state API (``ray.util.state``), which otherwise
    looks for every Ray on the machine and refuses when a test's own ``medhier`` process runs
    one beside it ("Found multiple active Ray instances")."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, ray_session):
    """One phantom training run finished as ``medhier train`` finishes it: temperatures,
    referral threshold and drift profile in ``best/``, metrics.json, plots and the model card
    (tests/trained.py). Shared by the tests of calibration, referral, model card and drift."""
    from tests.trained import finished_run as make

    return make(str(tmp_path_factory.mktemp("finished-run")))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, artifacts served through it),
    shared by the session and stopped by its own process id -> its URL."""
    import subprocess
    import sys
    import time

    import requests

    pytest.importorskip("mlflow", reason="MLflow is the optional extra medhier[tracking] ('.[dev]' installs it)")
    from tests.processes import descendants, gone_after

    root = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{_free_port()}"
    host, port = url[len("http://"):].split(":")
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", host, "--port", port, "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # no background job runner: tracking needs none, and it outlives a stopped server
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise TimeoutError(f"mlflow server did not answer in 240 s: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    children = descendants(server.pid)
    yield url
    server.terminate()  # mlflow forwards it to its uvicorn process and exits with it
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    for pid in gone_after(children, timeout=10):
        os.kill(pid, 9)
    log.close()
