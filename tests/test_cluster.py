"""The `ray job submit` entrypoints on a real two-node Ray cluster started on this machine.

The cluster is what `ray start` makes on two machines, squeezed onto one: a head node (GCS,
dashboard, job server, its own raylet) and a second node that joins it with `ray start
--address`, each with its own ports (free ones, chosen at run time), its own temp dir and token
authentication (Ray 2.60: RAY_AUTH_MODE=token). Jobs go through the `ray job submit` CLI with the
repository as --working-dir and jobs/runtime_env.yaml, exactly as the README's "Running on a Ray cluster" says.

Other Ray instances run on this machine: nothing here touches them. The cluster's processes are
found by a marker in their environment (every process a node starts inherits it) or the
cluster's temp dir in their command line, killed by PID, and the teardown asserts that none is
left. `ray stop` is never used: it would stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")  # the one reason to skip: without Ray there is no cluster to start

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the cluster runs the Python (and medhier) of this test run
RAY = str(BIN / "ray") if (BIN / "ray").exists() else (shutil.which("ray") or "ray")
SMOKE = "configs/smoke.yaml"
MARKER = "MEDHIER_TEST_CLUSTER_NODE"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
HEAD_CPUS, NODE2_CPUS = 4, 3  # logical CPUs on 2 cores: Ray Data keeps CPUs beside the Scorer
N_IMAGES, N_KILL_IMAGES = 40, 320


# -- the cluster -------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return False
    return stat.rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")  # a zombie is dead, not yet reaped


class LocalCluster:
    """A head node and a second node (custom resource {"node2": 1}) on 127.0.0.1."""

    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex[:12]
        self.token = secrets.token_hex(32)
        self.token_file = base / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.temp = {"head": base / "head", "node2": base / "node2"}
        ports = _free_ports(3 + 2 * 6)
        self.gcs_port, self.dashboard_port, self.client_port = ports[:3]
        self.node_ports = {"head": ports[3:9], "node2": ports[9:15]}
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    # environments ------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION", "RAY_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "token"
        # a private token file: ~/.ray/auth_token belongs to the other Ray instances here
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance-metadata lookups that would hang
        return env

    def node_env(self, node: str) -> dict[str, str]:
        env = self._base_env()
        env[MARKER] = f"{self.tag}-{node}"
        # Processes that look the cluster up themselves (Ray Train's placement-group cleaner
        # calls the state API with no address) would otherwise find every Ray on this machine
        # and give up ("Found multiple active Ray instances"). One Ray per machine in production.
        env["RAY_ADDRESS"] = self.gcs_address
        env["RAY_DEDUP_LOGS"] = "0"
        # notice a dead node in ~3 s instead of ~30 s
        env["RAY_health_check_period_ms"] = "1000"
        env["RAY_health_check_timeout_ms"] = "1000"
        env["RAY_health_check_failure_threshold"] = "3"
        return env

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self._base_env(), **extra}

    # start and stop ----------------------------------------------------------------------

    def _node_args(self, node: str) -> list[str]:
        nm, om, agent_http, agent_grpc, renv, metrics = self.node_ports[node]
        return [
            "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(self.temp[node]),
            "--node-manager-port", str(nm),
            "--object-manager-port", str(om),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(renv),
            "--metrics-export-port", str(metrics),
            "--object-store-memory", str(300 * 1024**2),
            "--disable-usage-stats",
        ]

    def _ray_start(self, node: str, args: list[str]) -> None:
        out = subprocess.run([RAY, "start", *args, *self._node_args(node)], env=self.node_env(node),
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"ray start ({node}) failed:\n{out.stdout}\n{out.stderr}"

    def start_head(self) -> None:
        self._ray_start("head", [
            "--head", "--port", str(self.gcs_port), "--num-cpus", str(HEAD_CPUS), "--num-gpus", "0",
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(self.client_port),
        ])

    def start_node2(self) -> None:
        self._ray_start("node2", [
            "--address", self.gcs_address, "--num-cpus", str(NODE2_CPUS), "--num-gpus", "0",
            "--resources", json.dumps({"node2": 1}),
        ])

    def processes(self, node: str | None = None) -> dict[int, str]:
        """Live processes of this cluster (of one node) -> {pid: command line}."""
        markers = [f"{MARKER}={self.tag}-{n}".encode() for n in ([node] if node else list(self.temp))]
        temps = [str(self.temp[n]).encode() for n in ([node] if node else list(self.temp))]
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")
            environ = _read(f"/proc/{pid}/environ").split(b"\0")
            if any(m in environ for m in markers) or any(t in cmdline for t in temps):
                if _alive(pid):
                    found[pid] = cmdline.decode(errors="replace").strip()
        return found

    def kill(self, node: str | None = None, timeout: float = 30) -> None:
        """SIGKILL every process of the node (of the cluster), until none is left."""
        deadline = time.monotonic() + timeout
        while (procs := self.processes(node)) and time.monotonic() < deadline:
            for pid in procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.3)
        left = self.processes(node)
        assert not left, f"processes of the test cluster survived SIGKILL: {left}"

    def busy_workers(self, node: str) -> list[str]:
        """Titles of the node's worker processes that run a task or an actor."""
        idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
        return [c for c in self.processes(node).values() if c.startswith("ray::") and not c.startswith(idle)]

    def python(self, code: str) -> str:
        """Run Python code as a driver connected to the cluster; -> its stdout."""
        out = subprocess.run([sys.executable, "-c", code], env=self.client_env(RAY_ADDRESS=self.gcs_address),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def resources(self) -> dict[str, float]:
        code = "import json, ray; ray.init(logging_level='ERROR'); print(json.dumps(ray.cluster_resources()))"
        return json.loads(self.python(code).strip().splitlines()[-1])

    def wait_for_cpus(self, cpus: float, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.resources().get("CPU", 0) != cpus:
            assert time.monotonic() < deadline, f"cluster never reached {cpus} CPUs: {self.resources()}"
            time.sleep(1)

    def session_log_dirs(self) -> list[Path]:
        """Each node's session log dir (not via the session_latest link: the same dir again)."""
        return [p for t in self.temp.values() for p in t.glob("session_*/logs") if not p.parent.is_symlink()]

    # jobs --------------------------------------------------------------------------------

    def submit(self, script: str, *args: str, wait: bool = True, runtime_env_json: str | None = None,
               submission_id: str | None = None, timeout: float = 600) -> tuple[str, subprocess.CompletedProcess]:
        """`ray job submit` the way the README shows it -> (submission id, the CLI's result)."""
        sid = submission_id or f"medhier-{Path(script).stem}-{uuid.uuid4().hex[:8]}"
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", ".", "--submission-id", sid]
        cmd += ["--runtime-env-json", runtime_env_json] if runtime_env_json else ["--runtime-env", "jobs/runtime_env.yaml"]
        cmd += ["--no-wait"] if not wait else []
        cmd += ["--", "python", script, *args]
        out = subprocess.run(cmd, cwd=ROOT, env=self.client_env(), capture_output=True, text=True, timeout=timeout)
        return sid, out

    def succeed(self, script: str, *args: str, **kwargs) -> tuple[str, subprocess.CompletedProcess]:
        """:meth:`submit`, waiting, and asserting that the CLI and ``ray job status`` both say it succeeded."""
        sid, out = self.submit(script, *args, **kwargs)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert self.status(sid) == "SUCCEEDED"
        return sid, out

    def job(self, sid: str) -> dict:
        """The job's record from the job server's REST API (GET /api/jobs/<id>), with the token."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{sid}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def wait(self, sid: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.job(sid)["status"]) not in TERMINAL:
            assert time.monotonic() < deadline, f"job {sid} still {status} after {timeout} s:\n{self.logs(sid)[-3000:]}"
            time.sleep(1)
        return status

    def status(self, sid: str) -> str:
        """`ray job status` (the CLI) -> SUCCEEDED, FAILED, ..."""
        out = self.cli("job", "status", "--address", self.dashboard_url, sid)
        text = out.stdout + out.stderr
        # "Job 'ID' succeeded" once it ended, "Status for job 'ID': RUNNING" before
        match = re.search(r"Job '[^']+' (succeeded|failed|stopped)", text) or re.search(r"Status for job '[^']+': (\w+)", text)
        assert match, text
        return match.group(1).upper()

    def logs(self, sid: str) -> str:
        """`ray job logs` (the CLI): the driver's output."""
        return self.cli("job", "logs", "--address", self.dashboard_url, sid).stdout

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=ROOT, env=self.client_env(**env), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    # Short path: Ray's Unix sockets live under the temp dir, and socket paths are limited to
    # 107 bytes. Not ~/.ray or /tmp/ray: those belong to the other Ray instances on the machine.
    base = Path(tempfile.mkdtemp(prefix="mhc-", dir="/tmp"))
    started: list[LocalCluster] = []
    try:
        for attempt in range(3):  # a free port can be taken by another Ray between choice and use
            c = LocalCluster(base / str(attempt))
            started.append(c)
            try:
                c.start_head()
                c.start_node2()
                c.wait_for_cpus(HEAD_CPUS + NODE2_CPUS)
                break
            except AssertionError:
                c.kill()
                if attempt == 2:
                    raise
        yield c
    finally:
        for c in started:  # also when start-up or a test failed; asserts that nothing is left
            c.kill()
            assert not c.processes()
        shutil.rmtree(base, ignore_errors=True)


# -- data --------------------------------------------------------------------------------------


def _archive_files(root: Path) -> set[str]:
    """What a report must have exactly one row for: every object but labels.csv (data.exclude)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "labels.csv"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-jobs")


@pytest.fixture(scope="module")
def archive(workdir) -> Path:
    from medhier.synthetic import spine as synthetic

    root = workdir / "archive"
    synthetic.generate_archive(str(root), N_IMAGES, seed=3, size=64)
    synthetic.add_broken_files(str(root), seed=3)
    return root


@pytest.fixture(scope="module")
def trained(cluster, archive, workdir) -> Path:
    """jobs/train.py, which prepares its cache (RUN/cache) first: the prepare job's work in the
    same job (test_secrets_in_the_runtime_env... submits jobs/prepare.py itself)."""
    run = workdir / "run"
    sid, out = cluster.succeed("jobs/train.py", "--archive", str(archive), "--output", str(run), "--config", SMOKE,
                              "runtime.progress=false", "train.epochs=1", "train.num_workers=1")
    return run


@pytest.fixture(scope="module")
def scored(cluster, trained, archive, workdir) -> Path:
    output = workdir / "scores"
    sid, out = cluster.succeed("jobs/score.py", "--archive", str(archive), "--checkpoint", str(trained / "best"),
                              "--output", str(output), "--config", SMOKE, "runtime.progress=false")
    return output


# -- tests -------------------------------------------------------------------------------------


def test_two_nodes_with_token_auth(cluster):
    resources = cluster.resources()
    assert resources["CPU"] == HEAD_CPUS + NODE2_CPUS and resources.get("node2") == 1
    assert cluster.processes("head") and cluster.processes("node2")
    ok = cluster.cli("job", "list", "--address", cluster.dashboard_url)
    assert ok.returncode == 0, ok.stderr
    # the job server refuses a request without the cluster's token
    denied = cluster.cli("job", "list", "--address", cluster.dashboard_url, RAY_AUTH_TOKEN_PATH="", RAY_AUTH_TOKEN="not-the-token")
    assert denied.returncode != 0 and "Invalid authentication token" in denied.stdout + denied.stderr


def test_train_job_prepares_the_cache(trained, archive):
    prepared = trained / "cache"
    info = json.loads((prepared / "cache.json").read_text())
    files = _archive_files(archive)
    counts = info["counts"]
    assert counts["ok"] == N_IMAGES and counts["objects_ok"] + counts["objects_error"] == len(files)
    assert counts["errors"] == len(files) - N_IMAGES
    rows = list((prepared / info["rows_dir"]).rglob("*.parquet"))
    assert rows and {p.parent.parent.name for p in rows} == {"status=ok", "status=error"}


def test_train_job_writes_a_loadable_best_checkpoint(trained):
    from medhier.classify.task import CLASSIFY
    from medhier.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(str(trained / "best"), CLASSIFY)
    assert loaded.epoch == 0 and loaded.model_id
    assert loaded.cfg.preprocess.image_size == 64
    assert (trained / "metrics.json").exists()


def test_score_job_reports_one_row_per_file(scored, archive):
    from medhier.infer.batch import report_table

    report = report_table(str(scored)).to_pydict()
    assert sorted(report["path"]) == sorted(_archive_files(archive))
    ok = [s == "ok" for s in report["status"]]
    assert sum(ok) == N_IMAGES
    assert all(leaf for leaf, good in zip(report["leaf_label"], ok) if good)
    assert all(reason for reason, good in zip(report["error_reason"], ok) if not good)


def test_plaque_fit_job_trains_xgboost_across_both_nodes(cluster, workdir):
    """jobs/plaque_fit.py on the frozen phantom cohort (tests/plaque/cohort.py) with one XGBoost
    worker per node: the model, its metrics against the baselines, and the plots."""
    from tests.plaque.cohort import PATIENTS_CSV, VISITS

    output = workdir / "plaque-model"
    sid, out = cluster.succeed("jobs/plaque_fit.py", "--measurements", VISITS, "--patients", PATIENTS_CSV, "--output", str(output),
                              "runtime.progress=false", "predict.num_workers=2", "predict.cpus_per_worker=1")
    metrics = json.loads((output / "metrics.json").read_text())
    assert sum(s["patients"] for s in metrics["splits"].values()) == 1000
    haemorrhage = metrics["factors"]["haemorrhage_change_mm3_per_year"]["test"]  # the interaction only trees hold
    assert haemorrhage["xgboost"]["r2"] > haemorrhage["ridge"]["r2"] + 0.2, haemorrhage
    assert (output / "model" / "model.json").is_file() and (output / "feature_importance.png").stat().st_size > 0


def test_nightly_cron_line_scores_only_what_is_new(cluster, trained, archive, scored, workdir):
    """The crontab line of deploy/cron/medhier-score.cron, run as cron runs it (its variables,
    bash, `\\%` unescaped) with this cluster's values: the next night scores only the new files."""
    from medhier.synthetic import spine as synthetic
    from medhier.infer.batch import report_table
    from tests.test_cluster_config import CRON_FILE, cron_command, read_crontab

    tonight = workdir / "archive-tonight"  # yesterday's files (same versions) plus new ones
    shutil.copytree(archive, tonight, copy_function=shutil.copy2)
    synthetic.generate_archive(str(tonight / "new"), 3, seed=21, size=64)
    cron_env, jobs = read_crontab(CRON_FILE)
    site = {
        "MEDHIER_HOME": str(ROOT), "MEDHIER_CONFIG": SMOKE, "MEDHIER_ARCHIVE": str(tonight),
        "MEDHIER_MODEL": str(trained / "best"), "MEDHIER_REPORTS": str(scored), "MEDHIER_LOG": str(workdir / "score.log"),
        "MEDHIER_LOCK": str(workdir / "score.lock"), "RAY_HEAD": cluster.dashboard_url,
        "RAY_AUTH_TOKEN_PATH": str(cluster.token_file), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    assert set(site) <= set(cron_env), f"the crontab no longer defines {set(site) - set(cron_env)}"
    env = {**cluster.client_env(), **cron_env, **site}
    env.pop("RAY_AUTH_MODE")  # the crontab line must turn token auth on itself
    (_, _, command), = jobs
    out = subprocess.run([cron_env.get("SHELL", "/bin/sh"), "-c", cron_command(command)], env=env, cwd=workdir,
                         capture_output=True, text=True, timeout=600)
    log = (workdir / "score.log").read_text()
    assert out.returncode == 0, log[-4000:] + out.stderr[-2000:]
    assert re.search(r"Job 'medhier-score-\d{8}T\d{6}' succeeded", log), log[-2000:]
    summary = json.loads((scored / "summary.json").read_text())
    assert (summary["files"], summary["already_scored"]) == (3, len(_archive_files(archive)))
    report = report_table(str(scored)).to_pydict()
    assert sorted(report["path"]) == sorted(_archive_files(tonight))  # still one row per file


def test_failing_job_ends_failed_naming_the_archive(cluster, trained, workdir):
    missing = workdir / "no-such-archive"
    sid, out = cluster.submit("jobs/score.py", "--archive", str(missing), "--checkpoint", str(trained / "best"),
                              "--output", str(workdir / "never"))
    assert out.returncode != 0  # `ray job submit` waits and exits 1 when the job fails
    assert cluster.status(sid) == "FAILED"
    assert f"archive '{missing}' not found" in cluster.logs(sid)
    assert not (workdir / "never").exists()


def test_secrets_in_the_runtime_env_stay_out_of_outputs_and_logs(cluster, workdir, s3_endpoint, s3_bucket):
    """Credentials given to one job (the way the README allows, though it prefers roles)
    reach its S3 reads and appear in nothing the job writes or logs."""
    import yaml

    from medhier.synthetic import spine as synthetic
    from medhier.config import StorageConfig

    archive = f"{s3_bucket}/archive"
    synthetic.generate_archive(archive, 12, seed=5, size=64, storage_cfg=StorageConfig(s3_endpoint=s3_endpoint))
    secret = f"fake-SECRET-{secrets.token_hex(16)}"
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env.setdefault("env_vars", {}).update({
        "AWS_ACCESS_KEY_ID": "fake-AKID-medhier", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"})
    output = workdir / "secret-cache"
    sid, out = cluster.succeed("jobs/prepare.py", "--archive", archive, "--output", str(output), "--config", SMOKE,
                              "runtime.progress=false", f"storage.s3_endpoint={s3_endpoint}",
                              runtime_env_json=json.dumps(runtime_env))
    assert json.loads((output / "cache.json").read_text())["counts"]["ok"] == 12  # the credentials worked

    needle = secret.encode()
    leaks = [str(p) for p in output.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaks, f"secret written to the job's outputs: {leaks}"
    assert secret not in cluster.logs(sid), "secret in `ray job logs`"
    assert secret not in out.stdout + out.stderr, "secret in `ray job submit` output"
    logged = {p for d in cluster.session_log_dirs() for p in d.rglob("*") if p.is_file() and needle in _read(str(p))}
    # Ray 2.60's runtime-env agent logs every runtime env it sets up, env_vars included, at INFO
    # ("Creating runtime env: {...}" in runtime_env_agent.log of each node that ran the job), and
    # `ray job list` shows them to anyone with the token. That is Ray's, not medhier's, and the
    # reason the README prefers instance roles / IRSA to credentials in a runtime env.
    # Nothing else - driver and worker logs, medhier's own files - may contain the secret.
    assert {p.name for p in logged} <= {"runtime_env_agent.log"}, f"secret in the cluster's session logs: {sorted(map(str, logged))}"


def test_scoring_survives_losing_a_node(cluster, trained, workdir):
    """Kill every process of the second node while a scoring job runs: the job must still
    succeed, with exactly one report row per file (none lost, none twice)."""
    from medhier.synthetic import spine as synthetic
    from medhier.infer.batch import report_table

    archive = workdir / "kill-archive"
    synthetic.generate_archive(str(archive), N_KILL_IMAGES, seed=11, size=64)
    output = workdir / "kill-scores"
    sid, out = cluster.submit("jobs/score.py", "--archive", str(archive), "--checkpoint", str(trained / "best"),
                              "--output", str(output), "--config", SMOKE, "runtime.progress=false",
                              "data.decode_batch_size=4", "score.batch_size=8", wait=False)
    assert out.returncode == 0, out.stderr
    try:
        deadline = time.monotonic() + 240
        while not cluster.busy_workers("node2"):  # wait until the second node works for the job
            status = cluster.job(sid)["status"]
            assert status not in TERMINAL, f"job ended ({status}) before the second node got any work"
            assert time.monotonic() < deadline, "the second node never got work"
            time.sleep(0.2)
        time.sleep(2)
        busy = cluster.busy_workers("node2")
        assert cluster.job(sid)["status"] == "RUNNING", "too late: the job finished before the node was killed"
        cluster.kill("node2")
        status = cluster.wait(sid, timeout=420)
        logs = cluster.logs(sid)
        assert status == "SUCCEEDED", f"job {status} after losing a node (it ran {busy} there):\n{logs[-6000:]}"
        report = report_table(str(output)).to_pydict()
        assert len(report["path"]) == len(set(report["path"])), "an object has two rows"
        assert sorted(report["path"]) == sorted(_archive_files(archive))
    finally:
        # leave a whole cluster for whatever runs next
        if not cluster.processes("node2"):
            cluster.start_node2()
            cluster.wait_for_cpus(HEAD_CPUS + NODE2_CPUS)
