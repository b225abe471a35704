"""Connecting to Ray: a cluster when one is given (``ray job submit`` sets RAY_ADDRESS), else a
local instance; quiet logs unless verbose; Ray Data progress bars on request; medhier's stop
signals kept in force after Ray installs its own (:mod:`medhier.stopping`)."""

from __future__ import annotations

import gc
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import TypeVar

from medhier import stopping
from medhier.config import RuntimeConfig

__all__ = ["cpu_threads", "execute_pipeline", "init_ray", "release_failed_pipeline", "set_verbosity", "shutdown_ray", "verbose"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "pydicom", "botocore", "urllib3", "filelock")


_VERBOSE = False


def verbose() -> bool:
    """Whether this process was asked for verbose logs (``--verbose``)."""
    return _VERBOSE


def set_verbosity(verbose: bool) -> None:
    """medhier logs at INFO when verbose, WARNING otherwise; third-party chatter only when verbose."""
    global _VERBOSE
    _VERBOSE = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("medhier").setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def init_ray(cfg: RuntimeConfig, verbose: bool = False) -> None:
    """Start or join Ray once per process; later calls are no-ops."""
    import ray  # seconds to import: `medhier synth` and `explain` never start Ray
    from ray.data import DataContext

    set_verbosity(verbose)
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": True,
            "configure_logging": True,
        }
        if address:
            ray.init(address=address, **kwargs)
        else:
            # Token auth is Ray 2.60's default for local instances (kept); the warning that says
            # so on every start is noise unless verbose.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                logging.INFO if verbose else logging.ERROR
            )
            # The dashboard stays on: Ray Train's placement-group cleaner queries the state API
            # it serves (without it, that cleaner polls and warns in a loop, costing CPU).
            with _local_instance_environment(verbose) as dashboard_port:
                ray.init(num_cpus=cfg.local_num_cpus or default_local_cpus(), dashboard_host="127.0.0.1",
                         dashboard_port=dashboard_port, **kwargs)
    if stopping.installed():  # ray.init set its own SIGTERM handling (exit, or abort with a stack trace)
        stopping.install()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = verbose
    ctx.verbose_stats_logs = verbose
    # A failed map stage raises its own exception (Ray's RayTaskError is then an instance of it),
    # not Ray Data's generic UserCodeException: callers tell an archive that stopped answering
    # (medhier.io.storage.ArchiveUnavailable) from a bug, and say so in one line.
    ctx.raise_original_map_exception = True
    use_v1_parquet_reader()
    if not verbose:
        _say_ray_disk_warnings_once()


# The raylet's line when its session directory's disk is over Ray's capacity threshold (0.95 by
# default; RAY_local_fs_capacity_threshold), printed every 10 s for as long as it stays so.
_DISK_FULL = re.compile(r"file_system_monitor\.cc:\d+: (?P<path>\S+) is over (?P<pct>[\d.]+)% full, "
                        r"available space: (?P<free>[\d.]+) GB; capacity: (?P<capacity>[\d.]+) GB")


class RayDiskWarnings:
    """Wraps the driver's printer of Ray's forwarded logs: the raylet's "disk over 95 % full"
    line, which it repeats every 10 s on each node whose disk is that full (between a training's
    epoch lines, for hours), becomes one medhier warning per node that says what it means and
    what to do; every other line is printed as Ray prints it."""

    def __init__(self, print_logs: Callable[[dict], None]):
        self.print_logs = print_logs
        self.warned: set[str] = set()

    def __call__(self, data: dict) -> None:
        if data.get("pid") == "raylet":
            lines = data.get("lines", [])
            kept = [line for line in lines if not self._disk_full(line, data.get("ip") or "?")]
            if len(kept) != len(lines):
                if not kept:
                    return
                data = {**data, "lines": kept}
        self.print_logs(data)

    def _disk_full(self, line: str, node: str) -> bool:
        match = _DISK_FULL.search(line)
        if match is None:
            return False
        if node not in self.warned:
            self.warned.add(node)
            log.warning(
                "Ray's session directory %s on node %s is on a disk over %s%% full (%.1f GB free of %.0f GB): "
                "Ray cannot spill objects there, and a run whose objects outgrow memory fails. Free "
                "space on that disk, or give Ray a temporary directory on a larger one (RAY_TMPDIR "
                "for a local instance, `ray start --temp-dir` on a cluster). Ray repeats this every "
                "10 s; medhier says it once per node.",
                match["path"], node, match["pct"], float(match["free"]), float(match["capacity"]))
        return True


def _say_ray_disk_warnings_once() -> None:
    """Put :class:`RayDiskWarnings` in front of the driver's printer of forwarded logs (Ray's
    handler ``ray_print_logs``, which ``ray.init`` registers when ``log_to_driver`` is on)."""
    try:
        # Ray's private dispatcher: no public hook filters forwarded lines; if it moves, Ray's
        # lines are printed unfiltered (as --verbose does)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [
                (name, RayDiskWarnings(handler) if name == "ray_print_logs" and not isinstance(handler, RayDiskWarnings) else handler)
                for name, handler in dispatcher.handlers
            ]
    except (ImportError, AttributeError):
        return


def use_v1_parquet_reader() -> None:
    """Read Parquet through Ray Data's V1 reader in this process, unless the user chose with
    ``RAY_DATA_USE_DATASOURCE_V2``. Ray 2.60's default V2 reader starts a pool of 32
    footer-reader actors - 32 new processes - for every ``read_parquet``, whatever its size.
    medhier reads caches and reports of a few files many times per run (each training's
    datasets, each evaluation, each search trial); on a 2-core node that pool made a read of 8
    rows take 8 s instead of 0.2 s, and an evaluation pass 28 s instead of 10. Called by
    :func:`init_ray`, and by any Ray process that builds datasets itself (a Tune trial): Ray
    Data's context is per process."""
    from ray.data import DataContext  # seconds to import, as in init_ray

    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        DataContext.get_current().use_datasource_v2 = False


class _local_instance_environment:
    """Environment for the processes of a local Ray instance, which inherit it from this one
    while ``ray.init`` starts them; this process's own environment is restored afterwards (its
    subprocesses, e.g. a ``ray job submit`` to another cluster, must not inherit it).

    - ``RAY_API_SERVER_ADDRESS``: this instance's dashboard. Ray's workers find the state API by
      looking for a running Ray on the machine; with two instances on one machine (a test
      session and a command it runs, two users) Ray Train's placement-group cleaner fails with
      "Found multiple active Ray instances" and a stack trace, and stops cleaning.
    - ``RAY_DATA_LOG_LEVEL=WARNING`` unless verbose: Ray Data's INFO lines from inside workers
      (each training pass's "execution finished") stay out of the console.
    -> the dashboard port to start the instance with.
    """

    def __init__(self, verbose: bool):
        self.port = _free_port()
        self.env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.port}"}
        if not verbose:
            self.env["RAY_DATA_LOG_LEVEL"] = os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> int:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return self.port

    def __exit__(self, *exc) -> bool:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_local_cpus() -> int:
    """Logical CPUs for a local Ray: half again the cores. Oversubscribing a little keeps cores
    busy while Ray Data's scheduler turns a task around, and leaves CPUs for its own tasks when
    training workers hold theirs (on 2 cores, workers holding every CPU hang Ray Data)."""
    cores = os.cpu_count() or 1
    return max(cores + 1, cores * 3 // 2)


def cpu_threads(requested: int) -> int:
    """Threads for a process's numerical library (torch's intra-op pool): the CPUs Ray gave it,
    but no more than the cores this process may run on. Ray's logical CPUs are a scheduling
    count: a local Ray has more of them than cores (:func:`default_local_cpus`), and a model
    actor holding "7 CPUs" on 2 cores ran its model 35x slower with 7 threads than with 2."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(requested), cores))


def shutdown_ray() -> None:
    import ray  # as in init_ray

    if ray.is_initialized():
        ray.shutdown()


def execute_pipeline(run: Callable[[], T]) -> T:
    """``run()``, which builds and consumes a Ray Data pipeline; if it raises, the pipeline's
    actors are released (:func:`release_failed_pipeline`) before the exception goes on. Build the
    datasets inside ``run``: references held by the caller's own frame would keep them alive."""
    try:
        return run()
    except BaseException as exc:
        release_failed_pipeline(exc)
        raise


def release_failed_pipeline(exc: BaseException) -> None:
    """Let the actors of a Ray Data pipeline that raised ``exc`` die now.

    Ray Data stops a failed execution but leaves its actor pool to die with the last reference
    to its handles, and the exception holds those references: its traceback (and that of the
    exceptions it chains) runs through frames of the executor's thread whose callers hold the
    executor. In a long-lived driver (a scheduler, a notebook, a test session) the pool's actors
    would keep their CPUs or GPUs, and the next pipeline would wait for them forever. This clears
    the locals of every finished frame reachable from the tracebacks (file and line numbers stay
    for the report) and collects the cycles that keep the executor alive.
    """
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        pending += [e.__cause__, e.__context__]
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:  # still running: the caller's own frames, a live thread's
                    pass
                frame = frame.f_back
            tb = tb.tb_next
    gc.collect()
