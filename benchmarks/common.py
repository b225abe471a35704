"""What the benchmark scripts share: the machine line of every table, a random-weights checkpoint,
the phantom archive the head comparisons train on, and a read-through that puts an archive in
the page cache.

The development VM is not always the same CPU (it has been an Intel part with AMX and an AMD EPYC
without it), and bf16 inference speed differs by ~1.5x between the two: every table names the CPU.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

from medhier.infer.compiled import cpu_info


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX (bf16 matrix units)."""
    name, flags = cpu_info()
    return f"{name} ({'AMX' if 'amx_bf16' in flags else 'no AMX'}{', avx512_bf16' if 'avx512_bf16' in flags else ''})"


def machine(gpu: bool = False) -> str:
    """``host | N cores | CPU model [| GPU name]``: the start of every table's header line."""
    import torch

    line = f"{platform.node()} | {os.cpu_count()} cores | {cpu_model()}"
    if gpu and torch.cuda.is_available():
        line += f" | GPU {torch.cuda.get_device_name()}"
    return line


def make_checkpoint(workdir: str, arch: str, image_size: int) -> str:
    """A checkpoint of ``arch`` with random weights (seed 0) under ``workdir``, made once."""
    import torch

    from medhier.classify.task import CLASSIFY
    from medhier.config import load_config
    from medhier.train.checkpoint import save_checkpoint

    path = os.path.join(workdir, f"ckpt-{arch}-{image_size}")
    if not os.path.exists(os.path.join(path, "model.pt")):
        cfg = load_config(None, [f"model.arch={arch}", "model.pretrained=none", f"preprocess.image_size={image_size}", "dicom.windows.CT=bone"])
        torch.manual_seed(0)
        save_checkpoint(path, CLASSIFY.build_model(cfg), cfg, CLASSIFY, epoch=0)
    return path


def head_archive(workdir: str, n: int, difficulty: float) -> tuple[str, str]:
    """-> (archive, cache) of the phantom set hier_vs_flat.py and head_ablation.py both use: ``n``
    128 px phantoms at ``difficulty`` (seed 31), generated once; the cache is only named here."""
    from medhier.synthetic import spine as synthetic

    archive = os.path.join(workdir, f"archive-{n}-{difficulty}")
    if not os.path.exists(os.path.join(archive, "labels.csv")):
        synthetic.generate_archive(archive, n, seed=31, size=128, difficulty=difficulty)
    return archive, os.path.join(workdir, f"cache-{n}-{difficulty}")


def carotid_archive(workdir: str, patients: int, seed: int) -> str:
    """A phantom carotid MR archive of ``patients`` patients under ``workdir``, generated once
    (a later run reuses it: ``truth_rates.parquet`` is the generator's last file)."""
    import shutil

    from medhier.synthetic import carotid

    root = os.path.join(workdir, f"carotid-{patients}-{seed}")
    if not os.path.exists(os.path.join(root, "truth_rates.parquet")):
        shutil.rmtree(root, ignore_errors=True)
        carotid.generate_plaque_archive(root, patients, seed=seed)
    return root


class RayHead:
    """A running Ray cluster's head, as a scheduled job finds it: ``ray start --head`` in a private
    temporary folder (token auth with a private token file, ports picked free, ``cpus`` logical
    CPUs), left idle ``settle`` seconds so that its daemons and pre-started workers are up. A
    process joins it with :attr:`client_env` (what ``ray job submit`` gives a job's driver:
    ``RAY_ADDRESS``). Stopped by its own processes' ids (they carry a marker in their
    environment), never by ``ray stop``, which would stop every Ray on the machine."""

    MARKER = "MEDHIER_BENCH_RAY_HEAD"

    def __init__(self, workdir: str, cpus: int, settle: float = 10.0):
        import secrets
        import tempfile

        self.tag, self.cpus, self.settle = secrets.token_hex(4), cpus, settle
        self.temp = tempfile.mkdtemp(prefix="mhb-", dir="/tmp")  # short: Ray's socket paths are limited
        self.token = os.path.join(workdir, f"ray-token-{self.tag}")
        with open(self.token, "w") as f:
            f.write(secrets.token_hex(16))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token}

    def __enter__(self) -> "RayHead":
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token, RAY_USAGE_STATS_ENABLED="0", **{self.MARKER: self.tag})
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        out = subprocess.run([ray, "start", "--head", "--port", str(self.port), "--num-cpus", str(self.cpus), "--num-gpus", "0",
                              "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp, "--dashboard-host", "127.0.0.1",
                              "--dashboard-port", str(_free_port()), "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180, check=False)
        if out.returncode:
            self.__exit__()
            raise RuntimeError(f"ray start --head failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        time.sleep(self.settle)
        return self

    def processes(self) -> list[int]:
        mark = f"{self.MARKER}={self.tag}".encode()
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    def __exit__(self, *exc) -> None:
        import shutil
        import signal

        deadline = time.monotonic() + 30
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.3)
        shutil.rmtree(self.temp, ignore_errors=True)
        if os.path.exists(self.token):
            os.remove(self.token)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive_files(root: str) -> list[str]:
    """Every object of the archive at ``root`` as a full path or URI, labels.csv left out."""
    from medhier.io import storage

    return [storage.join(root, o.path) for page in storage.list_objects(root, exclude=["*.csv"]) for o in page]


def read_through(paths: list[str], readers: int = 4) -> tuple[float, float]:
    """Read every file once (``readers`` threads) -> (files/s, MB/s). Run before the measurements:
    it puts the archive in the page cache when it fits, so that the runs measure medhier and not
    this VM's disk, and its rate says what the disk gives when it does not."""

    def read(path: str) -> int:
        with open(path, "rb") as f:
            return len(f.read())

    t = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        size = sum(pool.map(read, paths))
    seconds = time.perf_counter() - t
    return len(paths) / seconds, size / seconds / 1e6


def cpu_times() -> tuple[float, float, float] | None:
    """Machine-wide (busy, iowait, total) CPU seconds since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, iowait / hz, (user + nice + system + idle + iowait + irq + softirq + steal) / hz


def busy_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> tuple[float, float]:
    """-> (share of all cores busy, share waiting on the disk) between two :func:`cpu_times`."""
    if before is None or after is None or after[2] <= before[2]:
        return float("nan"), float("nan")
    total = after[2] - before[2]
    return (after[0] - before[0]) / total, (after[1] - before[1]) / total


def process_cpu() -> dict[int, tuple[int, str, float]]:
    """Every process now: pid -> (parent pid, command line, CPU seconds so far: user + system,
    all its threads), from /proc; {} where there is none."""
    hz, out = os.sysconf("SC_CLK_TCK"), {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):  # ended while being read
            continue
        out[pid] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / hz)
    return out


# Ray's processes that are not task workers: Ray Data's own actors, Ray's agents.
RAY_DATA_ACTORS = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor")
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def cpu_by_role(before: dict, after: dict, driver: int) -> dict[str, float]:
    """CPU seconds between two :func:`process_cpu` snapshots, by role in a local Ray started by
    the process ``driver``: ``workers`` (Ray's task worker processes, titled ``ray::...``),
    ``driver``, ``ray_data_actors``, ``ray_daemons`` (GCS, raylet, dashboard and its heads,
    agents, monitors: every other descendant of the driver), ``other`` (processes outside Ray).
    A process that ended between the snapshots is not counted; one that started is counted from
    zero."""
    def descends(pid: int) -> bool:
        seen = set()
        while pid in after and pid not in seen:
            seen.add(pid)
            pid = after[pid][0]
            if pid == driver:
                return True
        return False

    roles = dict.fromkeys(("workers", "driver", "ray_data_actors", "ray_daemons", "other"), 0.0)
    for pid, (_, cmd, cpu) in after.items():
        used = cpu - (before[pid][2] if pid in before else 0.0)
        if pid == driver:
            role = "driver"
        elif not descends(pid):
            role = "other"
        elif cmd.startswith(RAY_DATA_ACTORS):
            role = "ray_data_actors"
        elif cmd.startswith("ray::") and not cmd.startswith(RAY_AGENTS):
            role = "workers"
        else:
            role = "ray_daemons"
        roles[role] += used
    return roles
