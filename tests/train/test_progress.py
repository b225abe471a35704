"""The training console: one line per epoch, and what a user sees of `medhier train` as a whole."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from medhier.train.progress import epoch_line

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")
RAY_NOISE = ("core_worker.cc", "constructor arguments in the object store", "Ray deduplicates logs", "DeprecationWarning",
             "fontManager", "Progress bars disabled", "execution finished in", "Traceback", "SIGTERM received", "PC: @", "file_system_monitor")


@pytest.mark.parametrize(
    "record,epochs,line",
    [
        ({"epoch": 3, "train_loss": 0.84213, "leaf_macro_auc": 0.71349, "improved": True, "train_images_per_s": 41.234},
         12, "epoch  3 (4/12)  train loss 0.842  val leaf_macro_auc 0.713 (best)  41.2 images/s  elapsed 1 min 12 s  ETA 4 min 00 s"),
        ({"epoch": 11, "train_loss": 0.5, "leaf_macro_auc": None, "improved": False, "train_images_per_s": 1234.5},
         12, "epoch 11 (12/12)  train loss 0.5  val leaf_macro_auc n/a  1,234 images/s  elapsed 1 min 12 s"),
        ({"epoch": 1, "train_loss": 1.0, "leaf_macro_auc": 0.5, "improved": False, "early_stop": True, "train_images_per_s": 3.0},
         5, "epoch 1 (2/5)  train loss 1  val leaf_macro_auc 0.5  3 images/s  elapsed 1 min 12 s  "
            "stopping early: no better for train.early_stopping_patience epochs"),
    ],
)
def test_an_epoch_reads_as_one_line_of_rounded_numbers(record, epochs, line):
    assert epoch_line(record, epochs, "leaf_macro_auc", elapsed_s=72.4, mean_epoch_s=30.0) == line


@pytest.mark.slow  # not `ray`: medhier starts its own Ray, beside the session's
def test_medhier_train_prints_a_line_per_epoch_and_none_of_rays_noise_then_stops_on_ctrl_c(tmp_path):
    """`medhier train` as a user runs it, a real process with its own Ray: the cache's summary
    (its reason codes in their column), one line per epoch and nothing else while it trains;
    Ctrl-C after the second epoch: one line naming the checkpoints, status 130, no Ray left. (Ray
    Train's own Ctrl-C handler, which it installs whenever it trains in the main thread, would
    abort the run gracefully and exit with status 0.)"""
    from medhier.synthetic import spine as synthetic
    from tests.processes import descendants, gone_after, medhier, stop, wait_until

    archive = str(tmp_path / "archive")
    synthetic.generate_archive(archive, 40, seed=2, size=32, difficulty=0.1)
    synthetic.add_broken_files(archive, seed=2)
    out = tmp_path / "run"
    args = ["train", "--archive", archive, "--output", str(out), "--config", SMOKE, "train.epochs=40", "train.num_workers=1",
            "preprocess.image_size=32", "runtime.local_num_cpus=4"]
    # Ray's raylet says "disk over N% full" every 10 s while its disk is (CI's was, for a run):
    # lower its threshold below this disk's use so that it does here, and medhier says it once
    usage = shutil.disk_usage(tempfile.gettempdir())
    threshold = max(0.01, round((usage.total - usage.free) / usage.total / 2, 2))
    process = medhier(*args, env={"RAY_local_fs_capacity_threshold": str(threshold)})

    def two_epochs() -> bool:
        assert process.poll() is None, process.communicate()
        return len(list(out.glob("train/checkpoint_epoch*/model.pt"))) >= 2

    wait_until(two_epochs, timeout=400, every=0.5, what="two checkpoints")
    ray_processes = descendants(process.pid)
    code, stdout, stderr = stop(process, signal.SIGINT)
    assert code == 130, stderr
    assert not [line for line in (stdout + stderr).splitlines() if any(n in line for n in RAY_NOISE)]

    # the cache's table: every reason code in its column, the longest (unsupported_syntax) too
    reasons = re.findall(r"^  (\w+) +(\d+)$", stdout, flags=re.M)
    assert ("unsupported_syntax", "1") in reasons and len(reasons) >= 4
    epochs = [line for line in stdout.splitlines() if line.startswith("epoch")]
    assert len(epochs) >= 2
    for i, line in enumerate(epochs):
        assert re.fullmatch(rf"epoch +{i} \({i + 1}/40\)  train loss \d[\d.]*  val leaf_macro_auc (\d[\d.]*|n/a)( \(best\))?"
                            r"  [\d,.]+ images/s  elapsed \d+ (s|min \d\d s)  ETA \d+ (s|min \d\d s|h \d\d min)", line), line
        assert all(len(n.split(".")[-1]) <= 3 for n in re.findall(r"\d+\.\d+", line)), line  # rounded
    last = max(int(p.parent.name[-4:]) for p in out.glob("train/checkpoint_epoch*/model.pt"))
    # medhier's own warnings may come first (a 40-image archive leaves a split without some leaf:
    # data.cache says so); nothing else may, and the stop line is the last
    disk = [line for line in stderr.splitlines() if "WARNING medhier.runtime: Ray's session directory" in line]
    assert len(disk) == 1 and f"over {threshold * 100:g}% full" in disk[0], stderr
    lines = [line for line in stderr.strip().splitlines() if not re.match(r"^\S+ \S+ WARNING medhier\.", line)]
    assert lines == [
        f"medhier train: stopped by SIGINT. Committed: checkpoints up to epoch {last} in {out}/train (best so far: {out}/best); "
        f"a re-run resumes at epoch {last + 1}. To continue, re-run: medhier {' '.join(args)}"]
    assert not gone_after(ray_processes), "Ray processes outlived medhier train"
