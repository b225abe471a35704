"""The Ray Data layer: listing, ingest with labels, error rows, patient splits, the cache."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from medhier import columns as C
from medhier.classify.api import prepare
from medhier.classify.labels import LEAF_INDEX, MAIN, MAIN_INDEX, SUB, SUB_INDEX, HierarchicalLabels
from medhier.classify.taxonomy import Taxonomy, TaxonomyError
from medhier.config import Config, ConfigError, load_config
from medhier.data.cache import CacheInfo, check_preprocess_matches, load_cache
from medhier.data.cache import prepare as prepare_unlabelled
from medhier.data.labels import read_labels
from medhier.data.manifest import write_manifest
from medhier.data.splits import stratified_splits
from medhier.io import storage
from medhier.io.dicom import decode
from medhier.io.image import resize_image, to_uint8
from medhier.synthetic import spine as synthetic

pytestmark = pytest.mark.ray

N_IMAGES = 36
SIZE = 64


def _cfg(**overrides) -> Config:
    base = ["preprocess.image_size=48", "data.decode_batch_size=8", "runtime.progress=false"]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A phantom archive with labels.csv and one broken file of every kind -> (uri, broken)."""
    root = str(tmp_path_factory.mktemp("archive"))
    synthetic.generate_archive(root, N_IMAGES, seed=3, size=SIZE, compressed_fraction=0.3, monochrome1_fraction=0.2)
    broken = synthetic.add_broken_files(root, seed=3)
    return root, broken


@pytest.fixture(scope="module")
def prepared(archive, ray_session, tmp_path_factory):
    root, broken = archive
    cache = str(tmp_path_factory.mktemp("cache"))
    summary = prepare(_cfg(), root, cache)
    return root, broken, cache, summary


def _rows(cache: str, status: str, columns=None) -> pa.Table:
    info = CacheInfo.read(cache, None)
    path = storage.join(cache, info.rows_dir, f"{C.STATUS}={status}")
    return pads.dataset(path, format="parquet", partitioning="hive").to_table(columns=columns)


def _labels(root: str) -> list[dict]:
    with open(storage.join(root, "labels.csv")) as f:
        return list(csv.DictReader(f))


def test_every_file_yields_exactly_one_row_with_reasons(prepared):
    root, broken, cache, summary = prepared
    ok, err = _rows(cache, "ok"), _rows(cache, "error")
    ok_paths, err_paths = ok.column(C.PATH).to_pylist(), err.column(C.PATH).to_pylist()
    listed = {p for page in storage.list_objects(root, exclude=Config().data.exclude) for p in (o.path for o in page)}
    assert len(listed) == N_IMAGES + len(broken)
    # one row per file (single-frame files), none lost, none duplicated
    assert sorted(ok_paths + err_paths) == sorted(listed)
    reasons = dict(zip(err_paths, err.column(C.REASON).to_pylist()))
    assert reasons == broken
    messages = dict(zip(err_paths, err.column(C.ERROR).to_pylist()))
    assert all(path in messages[path] for path in broken)  # messages name the file
    assert summary.counts["ok"] == N_IMAGES and summary.counts["errors"] == len(broken)
    assert summary.listing.excluded == 1  # labels.csv, counted not dropped


def test_labels_splits_and_metadata(prepared):
    root, _, cache, summary = prepared
    ok = _rows(cache, "ok").to_pylist()
    truth = {r["path"]: r for r in _labels(root)}
    tax = Taxonomy.from_config(Config().taxonomy)
    patients: dict[str, set[str]] = {}
    # stratified (the default for a labelled archive): the patients of the ok rows dealt by their leaves
    dealt = stratified_splits([r[C.PATIENT_KEY] for r in ok], [r[LEAF_INDEX] for r in ok], len(tax.leaf_names), 0, 0.7, 0.15)
    for row in ok:
        expected = truth[row[C.PATH]]
        assert (row[MAIN], row[SUB]) == (expected["main"], expected["sub"])
        assert (row[MAIN_INDEX], row[SUB_INDEX], row[LEAF_INDEX]) == tax.encode(expected["main"], expected["sub"])
        assert row[C.PATIENT_KEY] == expected["patient_key"]
        assert row[C.SPLIT] == dealt[row[C.PATIENT_KEY]]
        patients.setdefault(row[C.PATIENT_KEY], set()).add(row[C.SPLIT])
        assert row[C.MODALITY] == "CT" and row[C.SOP_INSTANCE_UID]
    assert all(len(s) == 1 for s in patients.values())  # no patient in two splits
    assert sum(summary.counts["split_classes"]["train"].values()) == summary.counts["splits"]["train"]
    assert "PHANTOM" not in json.dumps(ok, default=str)  # no raw patient ID anywhere in the rows


def test_cached_images_equal_in_process_decoding(prepared):
    root, _, cache, _ = prepared
    ok = _rows(cache, "ok", columns=[C.PATH, C.IMAGE]).to_pylist()
    for row in ok[:8]:
        decoded = decode(storage.read_bytes(storage.join(root, row[C.PATH])), Config().dicom)
        expected = to_uint8(resize_image(decoded.pixels[0], 48, "pad"))
        np.testing.assert_array_equal(np.frombuffer(row[C.IMAGE], np.uint8).reshape(48, 48), expected)


def test_cache_is_reused_and_rebuilt_when_inputs_change(prepared, tmp_path):
    root, _, cache, first = prepared
    again = prepare(_cfg(), root, cache)
    assert again.reused and again.counts == first.counts
    info_before = CacheInfo.read(cache, None)
    rebuilt = prepare(_cfg(**{"preprocess.image_size": 32}), root, cache)
    assert not rebuilt.reused
    info_after = CacheInfo.read(cache, None)
    assert info_after.image_size == 32 and info_after.rows_dir != info_before.rows_dir
    assert not storage.exists(storage.join(cache, info_before.rows_dir))  # superseded rows removed
    with pytest.raises(ConfigError, match="image_size=32"):
        check_preprocess_matches(info_after, _cfg().preprocess)
    prepare(_cfg(), root, cache)  # leave the module's cache as the other tests expect it


def test_load_cache_reads_one_split_of_labelled_rows(prepared):
    _, _, cache, summary = prepared
    ds, info = load_cache(cache, None, "train", columns=[C.IMAGE, LEAF_INDEX])
    rows = ds.take_all()
    assert len(rows) == summary.counts["splits"]["train"]
    assert all(r[LEAF_INDEX] >= 0 and len(r[C.IMAGE]) == 48 * 48 for r in rows)
    with pytest.raises(FileNotFoundError, match="no committed cache"):
        load_cache(cache + "-missing", None)


def test_labels_by_sop_uid_and_unlabelled_rows(archive, ray_session, tmp_path):
    root, _ = archive
    ok_labels = _labels(root)
    uids = {}
    for row in ok_labels:
        uids[row["path"]] = decode(storage.read_bytes(storage.join(root, row["path"]))).meta[C.SOP_INSTANCE_UID]
    labelled = ok_labels[: N_IMAGES // 2]
    table = pa.table({
        C.SOP_INSTANCE_UID: [uids[r["path"]] for r in labelled] + ["1.2.3.999"],
        MAIN: [r["main"] for r in labelled] + ["normal"],
        SUB: [r["sub"] for r in labelled] + [""],  # empty sub: the main's single subclass
    })
    manifest = str(tmp_path / "labels.parquet")
    pq.write_table(table, manifest)
    summary = prepare(_cfg(), root, str(tmp_path / "cache"), labels=manifest)
    assert summary.counts["unlabelled"] == N_IMAGES - len(labelled)
    assert summary.counts["labels_without_file"] == 1
    rows = _rows(str(tmp_path / "cache"), "ok", columns=[C.PATH, MAIN, SUB]).to_pylist()
    by_path = {r["path"]: r for r in labelled}
    for row in rows:
        if row[C.PATH] in by_path:
            assert (row[MAIN], row[SUB]) == (by_path[row[C.PATH]]["main"], by_path[row[C.PATH]]["sub"])
        else:
            assert row[MAIN] == ""


BAD_LABELS = [
    ("path,main,sub\na.dcm,fracture,brust\n", TaxonomyError, r"labels.csv line 2: unknown subclass 'brust'"),
    ("path,main,sub\na.dcm,tumour,x\n", TaxonomyError, r"line 2: unknown main class 'tumour'"),
    ("path,main,sub\na.dcm,normal,normal\na.dcm,normal,normal\n", ValueError, r"line 3: path 'a.dcm' is labelled twice"),
    ("path,main,sub\na.dcm,fracture,\n", TaxonomyError, r"line 2: empty subclass for 'fracture'"),
    ("file,main\na.dcm,normal\n", ValueError, r"missing column"),
]


@pytest.mark.parametrize("text,error,message", BAD_LABELS)
def test_bad_labels_name_the_file_and_line(tmp_path, text, error, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(error, match=message):
        read_labels(str(path), HierarchicalLabels(Taxonomy.from_config(Config().taxonomy)), Config().storage)


def test_manifest_is_written_in_bounded_files(archive, tmp_path):
    root, broken = archive
    cfg = _cfg(**{"data.manifest_rows_per_file": 10})
    summary = write_manifest(root, str(tmp_path / "manifest"), cfg.data, cfg.storage)
    files = sorted((tmp_path / "manifest").iterdir())
    assert summary.manifest_files == len(files) == -(-(N_IMAGES + len(broken)) // 10)
    assert sum(pq.read_metadata(f).num_rows for f in files) == summary.objects
    # the digest does not depend on how the listing was chunked
    other = write_manifest(root, str(tmp_path / "manifest2"), _cfg().data, cfg.storage)
    assert other.digest == summary.digest


def test_multiframe_all_gives_one_row_per_frame(ray_session, tmp_path):
    import pydicom.data

    root = tmp_path / "mf"
    root.mkdir()
    src = pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm")
    (root / "two_frames.dcm").write_bytes(open(src, "rb").read())
    cache = str(tmp_path / "cache")
    for policy, frames in (("middle", [1]), ("all", [0, 1])):
        prepare(_cfg(**{"dicom.frames": policy}), str(root), cache)
        rows = _rows(cache, "ok", columns=[C.PATH, C.FRAME]).to_pylist()
        assert sorted(r[C.FRAME] for r in rows) == frames


@pytest.mark.s3
def test_prepare_from_s3_archive_into_s3_cache(archive, ray_session, s3_bucket, storage_cfg):
    root, broken = archive
    s3_root = f"{s3_bucket}/archive"
    for page in storage.list_objects(root):
        for obj in page:
            storage.write_bytes(storage.join(s3_root, obj.path), storage.read_bytes(storage.join(root, obj.path)), storage_cfg)
    cfg = _cfg(**{"storage.s3_endpoint": storage_cfg.s3_endpoint})
    cache = f"{s3_bucket}/cache"
    summary = prepare(cfg, s3_root, cache)
    assert summary.counts["ok"] == N_IMAGES and summary.counts["reasons"] == dict(__import__("collections").Counter(broken.values()))
    info = CacheInfo.read(cache, cfg.storage)
    assert info is not None and info.archive == s3_root
    ds, _ = load_cache(cache, cfg.storage, "train", columns=[LEAF_INDEX])
    assert ds.count() == summary.counts["splits"]["train"]


def test_missing_archive_is_named(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-archive"):
        prepare(_cfg(), str(tmp_path / "no-such-archive"), str(tmp_path / "cache"))


def test_a_cache_without_a_codec_holds_no_labels_and_cannot_train(archive, ray_session, tmp_path):
    """The platform alone (no task's labels codec): every object still yields its row, and the
    cache refuses to serve labelled rows it does not have."""
    root, broken = archive
    cache = str(tmp_path / "cache")
    summary = prepare_unlabelled(_cfg(), root, cache)
    assert summary.counts["ok"] == N_IMAGES and summary.counts["errors"] == len(broken)
    assert summary.counts["unlabelled"] == N_IMAGES and summary.counts["split_classes"] == {}
    assert MAIN_INDEX not in _rows(cache, "ok").column_names
    with pytest.raises(ValueError, match="holds no labels"):
        load_cache(cache, None, "train")
    assert load_cache(cache, None, "train", labelled_only=False)[0].count() == summary.counts["splits"]["train"]
