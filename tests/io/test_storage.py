"""Storage: the same calls on a local folder and on a real S3 endpoint (moto's server)."""

from __future__ import annotations

import os

import boto3
import pytest

from medhier.io import storage
from medhier.config import StorageConfig

FILES = {
    "P1/ST1/SE1/IM1.dcm": b"a" * 10,
    "P1/ST1/SE1/IM2.dcm": b"b" * 20,
    "P2/ST1/SE1/IM1.dcm": b"c" * 30,
    "P3/IM1.dcm": b"d",
    "top.dcm": b"e" * 5,
    "labels.csv": b"path,main,sub\n",
    "P2/.hidden": b"x",
}
EXCLUDE = ["labels.csv", "*.csv", ".*", "*/.*"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tree, in a folder or in a bucket -> (uri, StorageConfig)."""
    if request.param == "local":
        cfg = StorageConfig()
        uri = str(tmp_path / "archive")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        cfg = request.getfixturevalue("storage_cfg")
        uri = f"{bucket}/archive"
    for rel, data in FILES.items():
        storage.write_bytes(storage.join(uri, rel), data, cfg)
    return uri, cfg


def _all(pages):
    return [o for page in pages for o in page]


@pytest.mark.s3
def test_listing_streams_pages_and_counts_exclusions(root):
    uri, cfg = root
    excluded: list[str] = []
    pages = list(storage.list_objects(uri, cfg, exclude=EXCLUDE, page_size=2, excluded=excluded))
    assert all(len(p) <= 2 for p in pages)
    objects = {o.path: o for o in _all(pages)}
    expected = {k: v for k, v in FILES.items() if k not in ("labels.csv", "P2/.hidden")}
    assert set(objects) == set(expected)
    assert {k: o.size for k, o in objects.items()} == {k: len(v) for k, v in expected.items()}
    assert sorted(excluded) == ["P2/.hidden", "labels.csv"]
    if storage.is_s3(uri):
        assert all(o.etag for o in objects.values())  # ETags identify versions for the ledger
    assert all(o.mtime > 0 for o in objects.values())


@pytest.mark.s3
def test_read_write_round_trip_and_missing(root):
    uri, cfg = root
    target = storage.join(uri, "out/result.bin")
    storage.write_bytes(target, b"payload", cfg)
    assert storage.read_bytes(target, cfg) == b"payload"
    storage.write_bytes(target, b"new", cfg)  # overwrite
    assert storage.read_bytes(target, cfg) == b"new"
    assert storage.exists(target, cfg)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(uri, "nope.bin"), cfg)
    storage.delete(storage.join(uri, "out"), cfg)
    assert not storage.exists(target, cfg)


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "b.json"
    for i in range(3):
        storage.write_text(str(target), f"v{i}")
    assert os.listdir(tmp_path / "a") == ["b.json"]
    assert target.read_text() == "v2"


def test_missing_local_archive_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(storage.list_objects(str(tmp_path / "nowhere")))


@pytest.mark.s3
def test_missing_bucket_and_empty_prefix_are_named(s3_bucket, storage_cfg):
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        list(storage.list_objects("s3://no-such-bucket/x", storage_cfg))
    with pytest.raises(FileNotFoundError, match="has no objects"):
        list(storage.list_objects(f"{s3_bucket}/empty", storage_cfg))


@pytest.mark.s3
def test_parallel_s3_listing_finds_every_key_once(s3_bucket, storage_cfg):
    client = boto3.client("s3", endpoint_url=storage_cfg.s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    keys = [f"big/P{p:03d}/IM{i:04d}.dcm" for p in range(12) for i in range(110)]  # 1,320 keys
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    cfg = StorageConfig(s3_endpoint=storage_cfg.s3_endpoint, list_threads=4)
    listed = [o.path for o in _all(storage.list_objects(f"{s3_bucket}/big", cfg, page_size=500))]
    assert sorted(listed) == sorted(k[len("big/"):] for k in keys)


def test_normalize_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("data/x") == str(tmp_path / "data" / "x")
    assert storage.normalize("file:///a/b") == "/a/b"
    assert storage.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
