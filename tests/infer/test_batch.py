"""Archive scoring: report schema, every file accounted for, incremental runs, crash safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from medhier import columns as C
from medhier.classify.presets import eval_preset
from medhier.classify.report import leaf_column
from medhier.classify.score import score
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.cli import EXIT_ERROR_RATE, main
from medhier.config import load_config
from medhier.infer.batch import report_schema, report_table, score_archive
from medhier.io import storage
from medhier.io.image import decode_images
from medhier.synthetic import spine as synthetic
from medhier.train.checkpoint import load_checkpoint
from tests.fitted import fitted_checkpoint

pytestmark = pytest.mark.ray

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")
N = 24
REPO = str(Path(__file__).resolve().parents[2])


def _cfg(*overrides: str):
    return load_config(SMOKE, ["runtime.progress=false", "score.batch_size=8", "data.decode_batch_size=8", *overrides])


def _make_checkpoint(directory: str, seed: int, root: str) -> str:
    return fitted_checkpoint(directory, _cfg(), root, seed=seed, steps=15, epoch=7)


@pytest.fixture(scope="module")
def source_archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("score-archive"))
    synthetic.generate_archive(root, N, seed=9, size=64, compressed_fraction=0.3, monochrome1_fraction=0.2)
    broken = synthetic.add_broken_files(root, seed=9)
    return root, broken


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, source_archive):
    return _make_checkpoint(str(tmp_path_factory.mktemp("ckpt")), 0, source_archive[0])


@pytest.fixture()
def archive(source_archive, tmp_path):
    """A private copy, so that tests can add files."""
    root, broken = source_archive
    copy = str(tmp_path / "archive")
    shutil.copytree(root, copy)
    return copy, broken


def _rows_per_file(output: str) -> Counter:
    return Counter(report_table(output, columns=[C.PATH])[C.PATH].to_pylist())


def test_report_has_one_row_per_file_with_the_documented_schema(archive, checkpoint, ray_session, tmp_path):
    root, broken = archive
    out = str(tmp_path / "out")
    summary = score(_cfg(), root, checkpoint, out)
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    table = report_table(out)
    schema = report_schema(CLASSIFY, loaded.cfg)
    assert table.drop_columns([]).select(schema.names).schema == schema
    rows = table.to_pylist()
    assert Counter(r[C.PATH] for r in rows) == Counter({p: 1 for p in _listed(root)})
    assert summary.files == N + len(broken) and summary.rows == N + len(broken)
    assert summary.error_files == len(broken) and summary.images_ok == N

    errors = {r[C.PATH]: r for r in rows if r[C.STATUS] == "error"}
    assert {p: r["error_reason"] for p, r in errors.items()} == broken
    assert all(r["main_label"] is None and r["leaf_prob"] is None and p in r["error_message"] for p, r in errors.items())
    leaves = taxonomy_of(loaded).leaf_names
    for r in (r for r in rows if r[C.STATUS] == "ok"):
        probs = np.array([r[leaf_column(n)] for n in leaves])
        assert probs.sum() == pytest.approx(1.0, abs=1e-3)
        assert r["leaf_label"] == f"{r['main_label']}/{r['sub_label']}"  # the leaf lies in the main class
        assert r["leaf_prob"] == pytest.approx(r["main_prob"] * r["sub_prob"], rel=1e-3)
        assert r["model_id"] == loaded.model_id and r["model_version"] == "epoch-7"
        assert r["run_id"] == summary.run_id and r["sop_instance_uid"] and r["study_instance_uid"]
        assert len(r["patient_key"]) == 20
    assert len({r["leaf_label"] for r in rows if r["leaf_label"]}) >= 2
    text = json.dumps(rows, default=str)
    assert "PHANTOM" not in text  # no raw patient ID (PHANTOM-0001), name (PHANTOM^P0001) or issuer

    written = json.loads(Path(out, "summary.json").read_text())
    assert written["run_id"] == summary.run_id and written["errors"] == dict(Counter(broken.values()))
    studies = pa.parquet.read_table(Path(out, "studies", f"{loaded.model_id}__epoch-7.parquet")).to_pylist()
    ok_rows = [r for r in rows if r[C.STATUS] == "ok"]
    assert len(studies) == len({r[C.STUDY_INSTANCE_UID] for r in ok_rows})
    rank = dict(zip(leaves, taxonomy_of(loaded).severity_rank))
    for study in studies:
        mine = [r for r in ok_rows if r[C.STUDY_INSTANCE_UID] == study[C.STUDY_INSTANCE_UID]]
        worst = max(mine, key=lambda r: (rank[r["leaf_label"]], r["leaf_prob"]))
        assert study["most_severe_leaf"] == worst["leaf_label"] and study["n_images"] == len(mine)
        assert study["most_severe_prob"] == pytest.approx(worst["leaf_prob"])


def _listed(root: str) -> list[str]:
    return [o.path for page in storage.list_objects(root, exclude=load_config().data.exclude) for o in page]


def test_predictions_equal_the_model_called_directly(archive, checkpoint, ray_session, tmp_path):
    root, _ = archive
    out = str(tmp_path / "out")
    score(_cfg("score.precision=fp32"), root, checkpoint, out)
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    ok = [r for r in report_table(out).to_pylist() if r[C.STATUS] == "ok"]
    images = []
    for r in ok:
        _, (image,) = decode_images(Path(root, r[C.PATH]).read_bytes(), loaded.cfg.dicom, loaded.cfg.preprocess.image_size, loaded.cfg.preprocess.resize)
        images.append(image)
    with torch.no_grad():
        direct = loaded.model(eval_preset(loaded.cfg.preprocess)(torch.from_numpy(np.stack(images)))).log_p_leaf.exp().numpy()
    report = np.array([[r[leaf_column(n)] for n in taxonomy_of(loaded).leaf_names] for r in ok])
    np.testing.assert_allclose(report, direct, atol=1e-5)


INT8 = ("score.precision=int8", "score.int8_calibration_images=16", "score.int8_check_images=8")


@pytest.fixture(scope="module")
def int8_run(source_archive, checkpoint, ray_session, tmp_path_factory):
    """The archive scored in fp32 and in int8 (the int8 model built and kept in the model cache)
    -> (fp32 output, int8 output, int8 summary)."""
    root, _ = source_archive
    fp32_out, int8_out = str(tmp_path_factory.mktemp("fp32")), str(tmp_path_factory.mktemp("int8"))
    score(_cfg("score.precision=fp32"), root, checkpoint, fp32_out)
    return fp32_out, int8_out, score(_cfg(*INT8), root, checkpoint, int8_out)


def _by_path(out: str) -> dict[str, dict]:
    return {r[C.PATH]: r for r in report_table(out).to_pylist()}


def test_int8_scoring_agrees_with_fp32_and_accounts_for_every_file(source_archive, checkpoint, int8_run):
    _, broken = source_archive
    fp32_out, int8_out, summary = int8_run
    assert summary.precision == "int8" and summary.compiled
    # N good images in the sample: 16 calibrate, 8 others check against fp32
    check = summary.int8
    assert check["calibration_images"] == 16 and check["images"] == 8 and check["actors"] == 1 and not check["cached"]
    assert check["leaf_agreement"] >= 0.95 and 0 < check["max_abs_diff"] < 0.1  # > 0: the model did run in int8
    assert json.loads(Path(int8_out, "summary.json").read_text())["int8"] == check
    assert "int8 vs fp32     same leaf on" in summary.table()

    fp32, int8 = _by_path(fp32_out), _by_path(int8_out)
    assert fp32.keys() == int8.keys() and len(int8) == N + len(broken)  # every file, once
    assert {p: r["error_reason"] for p, r in int8.items() if r[C.STATUS] == "error"} == broken
    ok = [p for p, r in fp32.items() if r[C.STATUS] == "ok"]
    leaves = taxonomy_of(load_checkpoint(checkpoint, CLASSIFY)).leaf_names
    same = np.mean([fp32[p]["leaf_label"] == int8[p]["leaf_label"] for p in ok])
    diff = max(abs(fp32[p][leaf_column(n)] - int8[p][leaf_column(n)]) for p in ok for n in leaves)
    assert same >= 0.9 and 0 < diff < 0.1, (same, diff)
    assert all(int8[p]["leaf_label"].startswith(int8[p]["main_label"] + "/") for p in ok)


def test_a_second_run_takes_the_int8_model_from_the_cache_and_scores_the_same(source_archive, checkpoint, int8_run, tmp_path):
    """The nightly case: the same model again, on a machine of the same type. No calibration
    images are sampled, nothing is compiled, and every probability is the first run's, bit for bit."""
    root, _ = source_archive
    _, int8_out, first = int8_run
    out = str(tmp_path / "warm")
    cache = str(Path(int8_out, "compiled"))
    started = time.time()
    summary = score(_cfg(*INT8, f"score.model_cache={cache}"), root, checkpoint, out)
    assert first.compiled_model["cache"] == "built" and first.compiled_model["build_s"] > 0
    assert summary.compiled_model["cache"] == "hit" and summary.compiled_model["build_s"] == 0
    assert summary.compiled_model["built_at"] == json.loads(next(Path(cache).rglob("meta.json")).read_text())["built_at"]
    assert not list(Path(out).rglob("images.npz"))  # the calibration images were never sampled
    assert {k: v for k, v in summary.int8.items() if k != "cached"} == {k: v for k, v in first.int8.items() if k != "cached"}
    assert summary.int8["cached"] and "loaded from the model cache" in summary.table()
    assert len(list(Path(cache).rglob("model.pt2"))) == 1  # one entry: model x variant x machine
    warm, cold = _by_path(out), _by_path(int8_out)
    # when the model was ready: after the run began, before its first row was scored
    assert started < summary.compiled_model["ready_at"] <= min(r[C.SCORED_AT].timestamp() for r in warm.values() if r[C.SCORED_AT])
    assert warm.keys() == cold.keys()
    assert all(warm[p][k] == cold[p][k] for p in warm for k in warm[p] if k.startswith("p_") or k.endswith("_label"))


def test_a_warm_actor_builds_no_eager_model_and_imports_nothing_that_defines_one(checkpoint, int8_run):
    """Issue 24: a nightly run's start-up waits for its model actor's process. With the compiled
    int8 model in the cache, a fresh actor loads the package and nothing else: no eager model, no
    torchvision (nor the torch._dynamo it imports), no inductor, no training or plotting
    libraries. Asked for it (Grad-CAM, the fp32 reference), it builds the eager model then."""
    _, int8_out, _ = int8_run
    cfg = _cfg(*INT8)
    watched = ("torchvision", "torch._dynamo", "torch._inductor", "matplotlib", "sklearn", "ray.train")
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from medhier.classify.task import CLASSIFY\n"
        "from medhier.infer.actor import ActorSettings, Int8Settings, ModelActor\n"
        f"settings = ActorSettings(precision='int8', channels_last={cfg.train.channels_last!r}, threads=1, compile=True, "
        f"batch_size={cfg.score.batch_size}, model_cache={str(Path(int8_out, 'compiled'))!r})\n"
        f"actor = ModelActor(CLASSIFY, {checkpoint!r}, None, settings, Int8Settings('', 0.0, {cfg.score.int8_calibration_images}))\n"
        "images = np.random.default_rng(0).integers(0, 255, (3, actor.image_size, actor.image_size), dtype=np.uint8)\n"
        "warm = actor.predict_images(images)\n"
        f"state = {{'cache': actor.report.cache, 'eager': actor._eager is not None, 'loaded': sorted(m for m in {watched!r} if m in sys.modules)}}\n"
        "fp32 = actor.predict_images(images, eager=True)\n"
        "state.update(after=actor._eager is not None, leaves=[warm['pred_leaf'].tolist(), fp32['pred_leaf'].tolist()], "
        "torchvision='torchvision' in sys.modules)\n"
        "print(json.dumps(state))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["cache"] == "hit" and not state["eager"] and state["loaded"] == []
    assert state["after"] and state["torchvision"]  # built on demand
    assert [len(leaves) for leaves in state["leaves"]] == [3, 3]


def test_incremental_runs_score_only_new_objects(archive, checkpoint, ray_session, tmp_path):
    root, broken = archive
    out = str(tmp_path / "out")
    first = score(_cfg(), root, checkpoint, out)
    second = score(_cfg(), root, checkpoint, out)
    assert second.files == 0 and second.already_scored == first.files
    added = synthetic.generate_archive(str(tmp_path / "more"), 3, seed=77, size=64)
    new_paths = [p for p in _listed(added.out)]
    for p in new_paths:
        target = Path(root, "new", p)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(added.out, p), target)
    third = score(_cfg(), root, checkpoint, out)
    assert third.files == 3
    counts = _rows_per_file(out)
    assert all(v == 1 for v in counts.values()) and len(counts) == N + len(broken) + 3
    # another model scores everything again: one row per file and model
    other = _make_checkpoint(str(tmp_path / "other-ckpt"), 1, root)
    fourth = score(_cfg(), root, other, out)
    assert fourth.files == N + len(broken) + 3
    assert set(_rows_per_file(out).values()) == {2}


class FailAfter:
    """A test-only annotator: the model actor fails in its third batch, as a crashed node would."""

    def __init__(self, batches: int):
        self.batches, self.seen = batches, 0

    def __call__(self, actor, batch, ok, images, result):
        self.seen += 1
        if self.seen > self.batches:
            raise RuntimeError(f"injected failure after {self.batches} batches")
        return {}


def test_a_crashed_run_leaves_nothing_and_the_next_run_completes(archive, checkpoint, ray_session, tmp_path):
    root, broken = archive
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match="injected failure"):
        score_archive(_cfg("score.batch_size=4", "data.decode_batch_size=4"), root, checkpoint, out, CLASSIFY,
                      annotator=lambda run: FailAfter(2))
    assert not Path(out, "report").exists() and not Path(out, "ledger").exists()
    done = score(_cfg(), root, checkpoint, out)
    assert done.files == N + len(broken)
    assert _rows_per_file(out) == Counter({p: 1 for p in _listed(root)})
    # the crashed run's block ended with its error: it is dead at once (its heartbeat is gone), its
    # folder goes after the commit, and nothing of it was adopted (it ran with other batch sizes)
    assert len(done.removed_runs) == 1 and done.adopted == 0


def test_a_commit_keeps_no_second_copy_and_dead_runs_do_not_pile_up(archive, checkpoint, ray_session, tmp_path):
    """After the commit the run's folder keeps its record (config, summary, marker), not its rows;
    the folders of runs that died before their commit (stale heartbeat) go, a live one stays."""
    import json as _json
    import time

    root, _ = archive
    out = Path(tmp_path / "out")
    dead, alive = out / "runs" / "20200101T000000Z-dead00", out / "runs" / "29990101T000000Z-alive0"
    for folder, age in ((dead, 3600), (alive, 0)):
        (folder / "staging").mkdir(parents=True)
        (folder / "staging" / "part.parquet").write_bytes(b"rows of a run that never committed")
        (folder / "_ALIVE").write_text(_json.dumps({"host": "h", "pid": 1, "time": time.time() - age}))
    summary = score(_cfg(), root, checkpoint, str(out))
    assert summary.removed_runs == [dead.name]
    assert not dead.exists() and (alive / "staging").exists()
    assert sorted(p.name for p in (out / "runs" / summary.run_id).iterdir()) == ["_ALIVE", "_COMMITTED", "config.yaml", "summary.json"]


def test_commit_interrupted_before_the_ledger_is_rolled_forward(archive, checkpoint, ray_session, tmp_path):
    root, _ = archive
    out = str(tmp_path / "out")
    first = score(_cfg(), root, checkpoint, out)
    os.remove(Path(out, "ledger", f"run_id={first.run_id}.parquet"))  # as if killed between the two
    again = score(_cfg(), root, checkpoint, out)
    assert again.recovered_runs == [first.run_id] and again.files == 0
    assert set(_rows_per_file(out).values()) == {1}


def test_full_rescore_supersedes_earlier_rows_of_the_same_model(archive, checkpoint, ray_session, tmp_path):
    root, broken = archive
    out = str(tmp_path / "out")
    first = score(_cfg(), root, checkpoint, out)
    full = score(_cfg(), root, checkpoint, out, full=True)
    assert full.files == N + len(broken)
    runs = set(report_table(out, columns=["run_id"])["run_id"].to_pylist())
    assert runs == {full.run_id} and first.run_id not in runs
    assert set(_rows_per_file(out).values()) == {1}


def test_cli_exit_code_follows_the_error_rate(archive, checkpoint, ray_session, tmp_path, capsys):
    root, broken = archive
    args = ["score", "--archive", root, "--checkpoint", checkpoint, "--config", SMOKE, "runtime.progress=false"]
    rate = len(broken) / (N + len(broken))
    assert main([*args, "--output", str(tmp_path / "a"), "--max-error-rate", str(rate + 0.01)]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--max-error-rate", str(rate - 0.01)]) == EXIT_ERROR_RATE
    assert "exceeds --max-error-rate" in capsys.readouterr().err
    assert main(["score", "--archive", str(tmp_path / "nowhere"), "--checkpoint", checkpoint, "--output", str(tmp_path / "c")]) == 2


@pytest.mark.s3
def test_scoring_an_s3_archive_into_s3(source_archive, checkpoint, ray_session, s3_bucket, storage_cfg):
    root, broken = source_archive
    for path in _listed(root):
        storage.write_bytes(f"{s3_bucket}/archive/{path}", Path(root, path).read_bytes(), storage_cfg)
    cfg = _cfg(f"storage.s3_endpoint={storage_cfg.s3_endpoint}")
    summary = score(cfg, f"{s3_bucket}/archive", checkpoint, f"{s3_bucket}/scores")
    table = report_table(f"{s3_bucket}/scores", storage_cfg)
    assert Counter(table[C.PATH].to_pylist()) == Counter({p: 1 for p in _listed(root)})
    assert table.num_rows == summary.rows == N + len(broken)
    assert all(e for e in table[C.ETAG].to_pylist())  # S3 ETags recorded for the ledger
    again = score(cfg, f"{s3_bucket}/archive", checkpoint, f"{s3_bucket}/scores")
    assert again.files == 0


def test_explain_and_sr_outputs_sit_beside_the_report(archive, checkpoint, ray_session, tmp_path):
    from medhier.classify.sr import read_sr

    root, _ = archive
    out = str(tmp_path / "out")
    score(_cfg("score.explain_min_prob=0.3"), root, checkpoint, out, explain=True, sr=True)
    rows = report_table(out).to_pylist()
    ok = [r for r in rows if r[C.STATUS] == "ok"]
    chosen = [r for r in ok if r["main_label"] != "normal" and r["leaf_prob"] >= 0.3]
    assert chosen, "the fixture model should flag some abnormal images"
    for r in ok:
        if r in chosen:
            png = Path(out, r["explain_path"]).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            assert all(0 <= r[k] <= 1 for k in ("explain_peak_y", "explain_peak_x", "explain_com_y", "explain_com_x"))
        else:
            assert r["explain_path"] is None and r["explain_peak_y"] is None
        back = read_sr(Path(out, r["sr_path"]).read_bytes())
        assert back["referenced_sop_instance_uid"] == r[C.SOP_INSTANCE_UID]
        assert (back["main_label"], back["sub_label"]) == (r["main_label"], r["sub_label"])
        assert back["main_prob"] == pytest.approx(r["main_prob"], abs=1e-4)
        assert back["model_id"] == r["model_id"] and back["verification_flag"] == "UNVERIFIED"
    assert all(r["sr_path"] is None for r in rows if r[C.STATUS] == "error")


def test_a_cpu_scorer_leaves_its_node_a_cpu_for_the_decode_tasks(ray_session):
    from medhier.infer.actor import actor_resources

    # the session's single node has 8 logical CPUs: 7 for the model, 1 for decoding beside it
    assert actor_resources("false") == (0, 7.0)


def test_a_cpu_scorer_sizes_itself_to_the_cpus_another_job_leaves_free(ray_session):
    """A Serve replica or a training run holding CPUs: an actor sized on the node's total took
    the decode tasks' last CPU and the scoring pipeline waited forever."""
    import ray

    from medhier.infer.actor import actor_resources

    @ray.remote(num_cpus=2)
    class OtherJob:
        def ready(self) -> bool:
            return True

    other = OtherJob.remote()
    try:
        ray.get(other.ready.remote(), timeout=120)
        assert actor_resources("false") == (0, 5.0)  # 8 - 2 held, less 1 for decoding
    finally:
        ray.kill(other)


def test_scored_at_is_when_the_model_scored_the_row_not_when_the_report_was_written(checkpoint):
    import time

    from medhier.infer.actor import SCORED_MS, ActorSettings, ModelActor
    from medhier.infer.batch import to_report

    loaded = load_checkpoint(checkpoint, CLASSIFY)
    size = loaded.cfg.preprocess.image_size
    strings = lambda *v: np.array(v, dtype=object)  # noqa: E731
    batch = {
        C.PATH: strings("a.dcm", "broken.dcm"), C.SIZE: np.array([10, 3]), C.ETAG: strings("", ""), C.MTIME: np.array([1.0, 2.0]),
        C.SOP_INSTANCE_UID: strings("1.2.3", ""), C.STUDY_INSTANCE_UID: strings("1.2", ""), C.SERIES_INSTANCE_UID: strings("1.2.4", ""),
        C.FRAME: np.array([0, -1]), C.NUM_FRAMES: np.array([1, 0]), C.MODALITY: strings("CT", ""), C.BODY_PART: strings("SPINE", ""), C.PATIENT_KEY: strings("k", ""),
        C.STATUS: strings("ok", "error"), C.REASON: strings("", "truncated"), C.ERROR: strings("", "broken.dcm: truncated"),
        C.IMAGE: strings(np.full((size, size), 128, np.uint8).tobytes(), b""),
        C.MANUFACTURER: strings("MEDHIER", ""), C.PIXEL_SPACING: np.array([0.5, np.nan]),
        C.INTENSITY_MEAN: np.array([0.5, np.nan]), C.INTENSITY_STD: np.array([0.0, np.nan]),
    }
    actor = ModelActor(CLASSIFY, checkpoint, loaded.cfg.storage, ActorSettings(precision="fp32"))
    before = int(time.time() * 1000)
    scored = actor(batch)
    after = int(time.time() * 1000)
    assert ((scored[SCORED_MS] >= before) & (scored[SCORED_MS] <= after)).all()  # error rows too
    time.sleep(0.05)  # the report stage runs later: its own clock would say so
    report = to_report(scored, CLASSIFY, loaded.cfg, loaded.model_id, "v1", "run-1")
    stamps = report[C.SCORED_AT].cast(pa.int64()).to_numpy()
    np.testing.assert_array_equal(stamps, scored[SCORED_MS])
    assert report["status"].to_pylist() == ["ok", "error"] and report["error_reason"].to_pylist() == [None, "truncated"]


def test_rows_of_another_model_or_config_or_cut_short_are_never_adopted(archive, checkpoint, ray_session, tmp_path):
    """Four runs killed before their commit: one staged rows of another model, one ran with
    another config, one left only a file cut short by the kill (no Parquet footer), one staged
    five objects of this model and config. A full rescore adopts those five and nothing else."""
    import pyarrow.parquet as pq

    root, broken = archive
    out = Path(tmp_path / "out")
    first = score(_cfg(), root, checkpoint, str(out))
    rows = pq.read_table(out / "report" / f"run_id={first.run_id}" / "part-0.parquet")
    config = (out / "runs" / first.run_id / "config.yaml").read_text()

    def killed(name: str, table: pa.Table | None, config_text: str) -> None:
        (out / "runs" / name / "staging").mkdir(parents=True)
        (out / "runs" / name / "config.yaml").write_text(config_text)
        if table is not None:
            pq.write_table(table, out / "runs" / name / "staging" / "part-0.parquet")
        else:
            (out / "runs" / name / "staging" / "part-0.parquet").write_bytes(b"PAR1 the first half of a file")

    model = rows.schema.get_field_index(C.MODEL_ID)
    killed("20200101T000000Z-model", rows.set_column(model, C.MODEL_ID, pa.array(["another"] * rows.num_rows)), config)
    killed("20200101T000001Z-config", rows, config.replace("batch_size: 8", "batch_size: 16"))
    killed("20200101T000002Z-cut", None, config)
    killed("20200101T000003Z-good", rows.slice(0, 5), config)
    again = score(_cfg(), root, checkpoint, str(out), full=True)
    assert again.adopted_from == ["20200101T000003Z-good"] and again.adopted == 5
    assert again.files == N + len(broken) - 5
    assert _rows_per_file(str(out)) == Counter({p: 1 for p in _listed(root)})
