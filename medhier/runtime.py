"""Connecting to Ray: a cluster when one is given (``ray job submit`` sets RAY_ADDRESS), else a
local instance; quiet logs unless verbose; Ray Data progress bars on request."""

from __future__ import annotations

import logging
import os

from medhier.config import RuntimeConfig

__all__ = ["init_ray", "shutdown_ray", "set_verbosity"]

_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "pydicom", "botocore", "urllib3", "filelock")


def set_verbosity(verbose: bool) -> None:
    """medhier logs at INFO when verbose, WARNING otherwise; third-party chatter only when verbose."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("medhier").setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def init_ray(cfg: RuntimeConfig, verbose: bool = False) -> None:
    """Start or join Ray once per process; later calls are no-ops."""
    import ray
    from ray.data import DataContext

    set_verbosity(verbose)
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {
            "logging_level": logging.INFO if verbose else logging.WARNING,
            "log_to_driver": True,
            "configure_logging": True,
        }
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(
                num_cpus=cfg.local_num_cpus or None,
                include_dashboard=False,
                **kwargs,
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = verbose
    ctx.verbose_stats_logs = verbose


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
