"""A PACS as an archive and a destination, against a real Orthanc (tests/orthanc.py): QIDO-RS
listing, WADO-RS fetching, STOW-RS storing, credentials and outages."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medhier.config import ConfigError, StorageConfig, load_config
from medhier.io import dicomweb, storage
from medhier.synthetic import spine as synthetic
from tests.orthanc import free_port

pytestmark = pytest.mark.pacs

N = 6


@pytest.fixture(scope="module")
def archive(orthanc, tmp_path_factory):
    """A phantom archive with broken files, in a folder and in the PACS -> (folder, Loaded, URI
    restricted to its studies)."""
    root = tmp_path_factory.mktemp("pacs-io-archive")
    synthetic.generate_archive(str(root), N, seed=41, size=32, compressed_fraction=0.5)
    synthetic.add_broken_files(str(root), seed=41)
    loaded = orthanc.load(root)
    return root, loaded, f"{orthanc.uri}?StudyInstanceUID={','.join(loaded.studies)}"


def _listed(uri: str, cfg: StorageConfig, excluded: list | None = None) -> dict[str, storage.ObjectInfo]:
    return {o.path: o for page in storage.list_objects(uri, cfg, excluded=excluded) for o in page}


def test_orthanc_stores_the_parseable_files_and_refuses_the_others(archive):
    _, loaded, _ = archive
    assert sorted(loaded.refused) == ["broken/bad_header.dcm", "broken/empty.dcm", "broken/notes.txt", "broken/truncated.dcm"]
    assert len(loaded.objects) == N + 3  # j2k_garbage, mpeg2 (its own UID: see tests/orthanc.py), report_sr


@pytest.mark.parametrize("page_size,threads", [(1, 1), (2, 3), (1000, 8)])
def test_listing_finds_every_instance_once_whatever_the_paging(archive, page_size, threads):
    _, loaded, uri = archive
    listed = _listed(uri, StorageConfig(dicomweb_page_size=page_size, list_threads=threads))
    assert set(listed) == set(loaded.objects.values())
    for path, info in listed.items():
        assert info.etag == path.rsplit("/", 1)[1] and info.size == 0 and info.mtime == 0.0  # the ledger's identity: the UIDs


@pytest.mark.parametrize(
    "query,cfg_filters,expected",
    [
        ("StudyDate=20240101-20241231", {}, "all"),
        ("StudyDate=20240115", {}, "all"),
        ("StudyDate=-20231231", {}, "none"),
        ("ModalitiesInStudy=CT", {}, "all"),
        ("ModalitiesInStudy=MR,US", {}, "none"),
        ("", {"dicomweb_study_date": "20250101-"}, "none"),  # a config filter applies too...
        ("StudyDate=20240115", {"dicomweb_study_date": "20250101-"}, "all"),  # ...unless the URI sets its own
        ("", {"dicomweb_modalities": ["MR", "CT"]}, "all"),  # any of: each study once
        ("", {"dicomweb_studies": "first"}, "first"),
    ],
)
def test_qido_filters_choose_the_studies(archive, orthanc, query, cfg_filters, expected):
    _, loaded, restricted = archive
    studies = loaded.studies
    if cfg_filters.get("dicomweb_studies") == "first":
        uri, cfg_filters = orthanc.uri, {"dicomweb_studies": studies[:1]}
    else:  # the fixture's study list, in the URI, and the filter under test
        uri = restricted + (f"&{query}" if query else "")
    listed = _listed(uri, StorageConfig(**cfg_filters))
    want = {"all": set(loaded.objects.values()), "none": set(),
            "first": {p for p in loaded.objects.values() if p.startswith(studies[0] + "/")}}[expected]
    assert set(listed) == want


def test_fetched_bytes_are_the_stored_instance_in_its_own_transfer_syntax(archive):
    root, loaded, uri = archive
    read = storage.reader(uri, StorageConfig())
    for rel, path in loaded.objects.items():
        fetched = pydicom.dcmread(io.BytesIO(read(path)))
        original = pydicom.dcmread(Path(root, rel))
        assert fetched.SOPInstanceUID == path.rsplit("/", 1)[1]
        assert fetched.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # never transcoded
        if "PixelData" in original:
            assert fetched.PixelData == original.PixelData, rel


def test_an_instance_that_is_gone_is_file_not_found(archive):
    _, loaded, uri = archive
    study, series, _ = next(iter(loaded.objects.values())).split("/")
    with pytest.raises(FileNotFoundError, match="no longer has this instance"):
        storage.reader(uri, StorageConfig())(f"{study}/{series}/1.2.3.4.5")
    with pytest.raises(ValueError, match="not a DICOMweb object path"):
        storage.reader(uri, StorageConfig())("P0001/IM0001.dcm")


def _instance(root: Path, rel: str, **changes) -> pydicom.Dataset:
    ds = pydicom.dcmread(root / rel)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def test_series_of_excluded_modalities_are_counted_not_listed(archive, orthanc):
    root, loaded, uri = archive
    image = next(rel for rel in loaded.objects if rel.startswith("P"))
    sr_like = _instance(root, image, Modality="SR", SeriesInstanceUID=generate_uid(entropy_srcs=["sr-series", image]),
                        SOPInstanceUID=generate_uid(entropy_srcs=["sr", image]))
    (stored,) = dicomweb.store(orthanc.uri, [_bytes(sr_like)], StorageConfig())
    assert stored.stored
    sr_path = f"{sr_like.StudyInstanceUID}/{sr_like.SeriesInstanceUID}/{sr_like.SOPInstanceUID}"
    excluded: list[str] = []
    assert sr_path not in _listed(uri, StorageConfig(), excluded) and excluded == [sr_path]
    assert sr_path in _listed(uri, StorageConfig(dicomweb_exclude_modalities=[]))


def test_store_answers_for_each_object_and_never_duplicates(archive, orthanc):
    root, loaded, _ = archive
    image = next(rel for rel in loaded.objects if rel.startswith("P"))
    series = generate_uid(entropy_srcs=["stow-series", image])
    a, b = (_instance(root, image, SeriesInstanceUID=series, SOPInstanceUID=generate_uid(entropy_srcs=["stow", k])) for k in "ab")
    no_uids = _tiny(PatientName="NO^UIDS")
    del no_uids.SOPInstanceUID  # a Part 10 file pydicom reads, but no DICOM object: the PACS must refuse it
    cfg = StorageConfig()
    results = dicomweb.store(orthanc.uri, [_bytes(a), b"not dicom", _bytes(no_uids), _bytes(b)], cfg)
    assert [(r.sop_instance_uid, r.stored) for r in results] == [(a.SOPInstanceUID, True), ("", False), ("", False), (b.SOPInstanceUID, True)]
    assert "not a DICOM file" in results[1].message and "HTTP 400" in results[2].message  # the PACS refused it alone
    again = dicomweb.store(orthanc.uri, [_bytes(a)], cfg)
    assert again[0].stored
    web = dicomweb.client(orthanc.uri, cfg)
    found = web.search_for_instances(str(a.StudyInstanceUID), series)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted([a.SOPInstanceUID, b.SOPInstanceUID])  # once each


@pytest.mark.parametrize(
    "env,outcome",
    [
        ({}, True),  # the session's bearer token (tests/conftest.py)
        ({"MEDHIER_DICOMWEB_TOKEN": None, "MEDHIER_DICOMWEB_USER": "$user", "MEDHIER_DICOMWEB_PASSWORD": "$password"}, True),
        ({"MEDHIER_DICOMWEB_TOKEN": None}, "credentials were refused"),
        ({"MEDHIER_DICOMWEB_TOKEN": "wrong-token"}, "credentials were refused"),
        ({"MEDHIER_DICOMWEB_TOKEN": None, "MEDHIER_DICOMWEB_USER": "$user", "MEDHIER_DICOMWEB_PASSWORD": "wrong"}, "credentials were refused"),
        ({"MEDHIER_DICOMWEB_USER": "$user", "MEDHIER_DICOMWEB_PASSWORD": "$password"}, "set one way"),
        ({"MEDHIER_DICOMWEB_TOKEN": None, "MEDHIER_DICOMWEB_USER": "$user"}, "go together"),
        ({"MEDHIER_DICOMWEB_CA_BUNDLE": "/nonexistent/ca.pem"}, "MEDHIER_DICOMWEB_CA_BUNDLE='/nonexistent/ca.pem': no such file"),
    ],
)
def test_credentials_come_from_the_environment(orthanc, monkeypatch, env, outcome):
    for name, value in env.items():
        value = {"$user": orthanc.user, "$password": orthanc.password}.get(value, value)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = StorageConfig(dicomweb_retries=0)
    if outcome is True:
        assert storage.exists(orthanc.uri, cfg)
        return
    with pytest.raises((storage.ArchiveUnavailable, ValueError, FileNotFoundError), match=outcome):
        storage.exists(orthanc.uri, cfg)


def test_the_token_never_reaches_a_log(archive, orthanc, caplog):
    import os

    _, loaded, uri = archive
    token = os.environ["MEDHIER_DICOMWEB_TOKEN"]
    with caplog.at_level(logging.DEBUG):  # requests, urllib3 and dicomweb-client at their most talkative
        paths = list(_listed(uri, StorageConfig()))
        storage.reader(uri, StorageConfig())(paths[0])
        with pytest.raises(storage.ArchiveUnavailable) as refused:
            os.environ["MEDHIER_DICOMWEB_TOKEN"] = token + "-wrong"
            try:
                storage.exists(uri, StorageConfig(dicomweb_retries=0))
            finally:
                os.environ["MEDHIER_DICOMWEB_TOKEN"] = token
    assert caplog.records and token not in caplog.text and token not in str(refused.value)


def test_a_pacs_that_does_not_answer_is_unavailable_not_an_error_per_object(orthanc):
    cfg = StorageConfig(dicomweb_retries=1, dicomweb_backoff_s=0.01)
    down = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    for call in (lambda: _listed(down, cfg), lambda: storage.exists(down, cfg), lambda: storage.reader(down, cfg)("1.2/1.3/1.4"),
                 lambda: dicomweb.store(down, [_bytes(_tiny())], cfg)):
        with pytest.raises(storage.ArchiveUnavailable, match=r"did not answer after 1 retries.*ConnectionError"):
            call()
    with pytest.raises(FileNotFoundError, match="no DICOMweb service at"):
        _listed(f"{orthanc.url.replace('http', 'dicomweb+http')}/not-dicom-web", cfg)


def _tiny(**elements) -> pydicom.Dataset:
    """A minimal Part 10 dataset (preamble, DICM, file meta) with a SOP Instance UID."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset("tiny", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPInstanceUID = generate_uid()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("dicomweb+http://PACS.example:8042/dicom-web/", "dicomweb+http://pacs.example:8042/dicom-web"),
        ("DICOMweb+HTTPS://pacs/wado?StudyDate=20240101-&ModalitiesInStudy=mr,ct",
         "dicomweb+https://pacs/wado?ModalitiesInStudy=CT,MR&StudyDate=20240101-"),
        ("dicomweb+http://pacs/x?StudyInstanceUID=1.2.3,1.2.10", "dicomweb+http://pacs/x?StudyInstanceUID=1.2.10,1.2.3"),
        ("dicomweb+http://[::1]:8042/dicom-web", "dicomweb+http://[::1]:8042/dicom-web"),
        ("dicomweb+http://user:secret@pacs/x", "credentials in a URI"),
        ("dicomweb+http://pacs/x?Modality=CT", "unknown filter 'Modality' (did you mean 'ModalitiesInStudy'?)"),
        ("dicomweb+http://pacs/x?StudyDate=2024", "StudyDate: '2024' is not a DICOM date"),
        ("dicomweb+http://pacs/x?StudyInstanceUID=1.2.x", "StudyInstanceUID: ['1.2.x'] are not DICOM UIDs"),
        ("dicomweb+http://pacs/x?StudyDate=20240101&StudyDate=20240102", "StudyDate given twice"),
        ("dicomweb+http:///dicom-web", "names no host"),
    ],
)
def test_uris_normalise_or_fail_naming_the_problem(uri, expected):
    if expected.startswith("dicomweb+"):
        assert storage.normalize(uri) == expected and storage.is_dicomweb(uri)
        return
    with pytest.raises(ValueError, match=re.escape(expected)):
        storage.normalize(uri)
    assert "secret" not in expected


def test_a_pacs_is_read_never_written_and_bad_filters_fail_the_config():
    with pytest.raises(ValueError, match="listed and read, never written"):
        storage.write_bytes("dicomweb+http://pacs/dicom-web/x.dcm", b"")
    for override, message in [("storage.dicomweb_study_date=2024", "storage.dicomweb_study_date: '2024'"),
                              ("storage.dicomweb_modalities=[ct]", "storage.dicomweb_modalities: ['ct']"),
                              ("storage.dicomweb_page_size=0", "storage.dicomweb_page_size: must be > 0")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
