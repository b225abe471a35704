"""The training console: one line per epoch, printed by the driver while Ray Train runs.

    rank 0 ──after each epoch──▶ OUTPUT/history.json ◀──every 2 s── driver: a line per new epoch

Rank 0 writes the run's history after every epoch (the harness needs it anyway); the driver
follows that file rather than the workers' own output, which Ray forwards prefixed with the
worker's name and pid and interleaved with its own lines. A line reads::

    epoch 3 (4/12)  train loss 0.842  val leaf_macro_auc 0.713 (best)  41.2 images/s  elapsed 1 min 12 s  ETA 3 min 40 s

Epochs are numbered from 0, as in history.json, the checkpoint folders and a checkpoint's
``model_version`` (``epoch-3``); the bracket counts them. ``ETA``: the epochs still to run times the mean epoch so far (an upper bound when early stopping
may end the run sooner). A resumed run prints only the epochs it runs itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from medhier.config import Config
from medhier.console import duration, number
from medhier.io import storage

__all__ = ["EpochLines", "epoch_line"]


def epoch_line(record: dict[str, Any], epochs: int, metric: str, elapsed_s: float, mean_epoch_s: float) -> str:
    """One epoch of ``history.json`` as the line above."""
    epoch = int(record["epoch"])
    width = len(str(epochs))
    parts = [f"epoch {epoch:>{width}} ({epoch + 1}/{epochs})", f"train loss {number(record.get('train_loss'))}",
             f"val {metric} {number(record.get(metric))}" + (" (best)" if record.get("improved") else ""),
             f"{number(record.get('train_images_per_s'))} images/s", f"elapsed {duration(elapsed_s)}"]
    left = epochs - epoch - 1
    if record.get("early_stop"):
        parts.append("stopping early: no better for train.early_stopping_patience epochs")
    elif left:
        parts.append(f"ETA {duration(left * mean_epoch_s)}")
    return "  ".join(parts)


class EpochLines:
    """While the block runs, print a line for each epoch that appears in ``OUTPUT/history.json``
    (and once more at the end, so the last epoch is never missed)."""

    def __init__(self, cfg: Config, output: str, stream: TextIO | None = None, every_s: float = 2.0, metric: str = ""):
        self.cfg, self.output, self.every_s = cfg, output, every_s
        self.stream = stream
        self.uri = storage.join(output, "history.json")
        self.metric = metric or cfg.train.metric  # the task's validation metric (the classifier's is train.metric)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="medhier-epochs", daemon=True)
        self._printed = -1
        self._start = time.perf_counter()

    def __enter__(self) -> EpochLines:
        self._start = time.perf_counter()
        history = self._history()
        self._printed = max((int(r["epoch"]) for r in history), default=-1)  # a resumed run's earlier epochs
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join(timeout=5)
        self._print_new()
        return False

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            self._print_new()

    def _history(self) -> list[dict[str, Any]]:
        try:
            return json.loads(storage.read_bytes(self.uri, self.cfg.storage))
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write on a local disk
            return []
        except OSError:  # storage hiccup: the next poll tries again
            return []

    def _print_new(self) -> None:
        history = self._history()
        seconds = [float(r["epoch_seconds"]) for r in history if r.get("epoch_seconds")]
        mean = sum(seconds) / len(seconds) if seconds else 0.0
        for record in history:
            if int(record["epoch"]) > self._printed:
                line = epoch_line(record, self.cfg.train.epochs, self.metric, time.perf_counter() - self._start, mean)
                print(line, file=self.stream or sys.stdout, flush=True)
                self._printed = int(record["epoch"])
