"""URIs -> filesystems: local folders and ``s3://bucket/prefix`` through the same calls, and a
PACS (``dicomweb+http(s)://host/prefix``) as an archive to list and read.

Reads and writes go through pyarrow's filesystems (what Ray Data uses); listing S3 uses boto3's
paginator because it streams pages and returns ETags, which pyarrow's listing does not.
Credentials are never configured here: both libraries read the standard AWS environment
variables, shared profile or instance role.

A DICOMweb archive (:mod:`medhier.io.dicomweb`) is read-only: :func:`list_objects`,
:func:`reader`, :func:`exists` and :func:`normalize` take its URI; the calls that need a
filesystem (:func:`filesystem`, :func:`read_bytes`, :func:`write_bytes`) refuse it, naming it.
An instance is listed as ``path = "<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>"``
with ``etag`` = its SOPInstanceUID and ``size`` = ``mtime`` = 0 (QIDO-RS says neither), so the
manifest, the ingest and the ledger treat it like any other object.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs

from medhier.io.streaming import stream_threads


__all__ = [
    "ArchiveUnavailable",
    "DICOMWEB_SCHEMES",
    "ObjectInfo",
    "StorageConfig",
    "check_dicomweb_filters",
    "delete",
    "exists",
    "filesystem",
    "is_dicomweb",
    "is_s3",
    "join",
    "list_objects",
    "normalize",
    "read_bytes",
    "reader",
    "relative_to",
    "write_bytes",
]


class StorageConfigError(ValueError):
    """A storage setting is wrong; the message names the key (``medhier.config`` makes it a ConfigError)."""


class ArchiveUnavailable(ConnectionError):
    """An archive did not answer (refused connections, timeouts, overload or refused credentials,
    after retries): nothing can be said about its objects, so a job stops rather than record
    them as errors. The message names the archive, the problem and what to check."""


DICOMWEB_SCHEMES = ("dicomweb+http://", "dicomweb+https://")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@dataclass
class StorageConfig:
    """Where object storage lives. Credentials never go here: boto3 and pyarrow read the standard
    AWS environment variables, profile or instance role, so no secret is ever written out with the
    resolved config."""

    s3_endpoint: str = ""  # e.g. http://127.0.0.1:5000 for MinIO/moto; empty = AWS
    s3_region: str = ""  # empty = AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    s3_anonymous: bool = False  # public buckets
    list_threads: int = 8  # parallel listing: S3 sub-prefixes, DICOMweb studies
    read_threads: int = 16  # concurrent object GETs (S3) or WADO-RS retrievals inside one decode task
    # DICOMweb archives and destinations (medhier.io.dicomweb). Credentials never go here: they
    # come from MEDHIER_DICOMWEB_TOKEN or MEDHIER_DICOMWEB_USER/_PASSWORD (and the CA bundle from
    # MEDHIER_DICOMWEB_CA_BUNDLE). The QIDO-RS filters below apply unless the archive URI sets its own.
    dicomweb_study_date: str = ""  # StudyDate: YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-
    dicomweb_modalities: list[str] = field(default_factory=list)  # studies with any of these (ModalitiesInStudy)
    dicomweb_studies: list[str] = field(default_factory=list)  # only these StudyInstanceUIDs
    # Series of these modalities are not listed (counted as excluded): medhier's own SRs and SEGs
    # sent back to the PACS land in the source's study and must not be scored as images.
    dicomweb_exclude_modalities: list[str] = field(default_factory=lambda: ["SR", "SEG", "KO", "PR"])
    dicomweb_page_size: int = 1000  # QIDO-RS results per request (limit/offset paging)
    dicomweb_timeout_s: float = 60.0  # per HTTP request (connect and each read)
    dicomweb_retries: int = 5  # retries of a refused connection, timeout, 408/429/502/503/504
    dicomweb_backoff_s: float = 0.5  # first wait between retries; doubles each time (Retry-After wins)
    dicomweb_stow_batch: int = 16  # instances per STOW-RS request
    dicomweb_stow_threads: int = 4  # concurrent STOW-RS requests

    def validate(self, name: str) -> None:
        if self.s3_endpoint and not self.s3_endpoint.startswith(("http://", "https://")):
            raise StorageConfigError(
                f"{name}.s3_endpoint: {self.s3_endpoint!r} must start with http:// or https://"
            )
        for key in ("list_threads", "read_threads", "dicomweb_page_size", "dicomweb_timeout_s", "dicomweb_stow_batch",
                    "dicomweb_stow_threads"):
            if getattr(self, key) <= 0:
                raise StorageConfigError(f"{name}.{key}: must be > 0, got {getattr(self, key)}")
        for key in ("dicomweb_retries", "dicomweb_backoff_s"):
            if getattr(self, key) < 0:
                raise StorageConfigError(f"{name}.{key}: must be >= 0, got {getattr(self, key)}")
        check_dicomweb_filters(f"{name}.dicomweb_", self.dicomweb_study_date, self.dicomweb_modalities, self.dicomweb_studies)
        bad = [m for m in self.dicomweb_exclude_modalities if not re.fullmatch(r"[A-Z0-9_]{1,16}", m)]
        if bad:
            raise StorageConfigError(f"{name}.dicomweb_exclude_modalities: {bad} are not DICOM modality codes (upper case, e.g. SR)")


def check_dicomweb_filters(where: str, study_date: str, modalities: list[str], studies: list[str],
                           names: tuple[str, str, str] = ("study_date", "modalities", "studies")) -> None:
    """Raise StorageConfigError when a QIDO-RS filter value is malformed; the message starts with
    ``where`` and the filter's name from ``names`` (date, modalities, studies)."""
    if study_date and not (_DATE_RANGE.match(study_date) and study_date != "-"):
        raise StorageConfigError(
            f"{where}{names[0]}: {study_date!r} is not a DICOM date or range (YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-)"
        )
    bad = [m for m in modalities if not re.fullmatch(r"[A-Z0-9_]{1,16}", m)]
    if bad:
        raise StorageConfigError(f"{where}{names[1]}: {bad} are not DICOM modality codes (upper case, e.g. CT, MR)")
    bad = [u for u in studies if not (_UID.match(u) and len(u) <= 64)]
    if bad:
        raise StorageConfigError(f"{where}{names[2]}: {bad[:3]} are not DICOM UIDs (digits and dots, at most 64 characters)")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``path`` is relative to the listed root, "/"-separated."""

    path: str
    size: int
    etag: str  # "" for local files
    mtime: float  # seconds since the epoch


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_dicomweb(uri: str) -> bool:
    """``dicomweb+http://`` or ``dicomweb+https://``: a PACS (see :mod:`medhier.io.dicomweb`)."""
    return uri[:20].lower().startswith(DICOMWEB_SCHEMES)


def normalize(uri: str) -> str:
    """Absolute local paths (Ray workers run in other directories); S3 URIs without a trailing /;
    DICOMweb URIs in one canonical spelling (lower-case scheme and host, sorted filters)."""
    if is_dicomweb(uri):
        from medhier.io import dicomweb  # requests and dicomweb-client load only when a PACS is named

        return dicomweb.normalize(uri)
    if is_s3(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def relative_to(uri: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    if not uri.startswith(root):
        raise ValueError(f"{uri!r} is not under {root!r}")
    return uri[len(root) :]


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """-> (pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    cfg = cfg or StorageConfig()
    if is_dicomweb(uri):
        raise ValueError(f"{uri!r}: a DICOMweb archive is listed and read, never written: outputs go to a folder or s3://")
    if is_s3(uri):
        return _s3_filesystem(cfg.s3_endpoint, _region(cfg), cfg.s3_anonymous), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str, region: str, anonymous: bool) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region, "anonymous": anonymous}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    # Retries with backoff: object stores throttle (503 SlowDown) under parallel decode tasks.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=6)
    return pafs.S3FileSystem(**kwargs)


def _region(cfg: StorageConfig) -> str:
    return cfg.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client(cfg: StorageConfig | None = None):
    """A boto3 S3 client for the configured endpoint (used for listing with ETags)."""
    import boto3  # half a second to import, and only S3 listing needs it
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    cfg = cfg or StorageConfig()
    boto_cfg = BotoConfig(
        retries={"max_attempts": 6, "mode": "standard"},
        max_pool_connections=max(cfg.list_threads, cfg.read_threads) + 4,
        signature_version=UNSIGNED if cfg.s3_anonymous else None,
    )
    return boto3.client(
        "s3", endpoint_url=cfg.s3_endpoint or None, region_name=_region(cfg), config=boto_cfg
    )


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "not exist" in str(exc) or "NoSuchKey" in str(exc) or "NoSuchBucket" in str(exc):
            raise FileNotFoundError(f"{uri}: {exc}") from None
        raise


def reader(root: str, cfg: StorageConfig | None = None) -> Callable[[str], bytes]:
    """A function that reads the object at a listed path (relative to ``root``) -> its bytes.
    Decode tasks read through it, whatever kind of archive ``root`` is. An object that is gone
    raises FileNotFoundError; an archive that does not answer raises :class:`ArchiveUnavailable`."""
    if is_dicomweb(root):
        from medhier.io import dicomweb  # requests and dicomweb-client load only when a PACS is named

        return dicomweb.reader(root, cfg or StorageConfig())
    fs, base = filesystem(root, cfg)

    def read(rel: str) -> bytes:
        with fs.open_input_stream(f"{base}/{rel}") as f:
            return f.read()

    return read


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object atomically: readers see the old object or the new one, never a part.

    Local files go through a temporary file and a rename; an S3 PUT is atomic by itself.
    """
    fs, path = filesystem(uri, cfg)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    """Whether a file or folder exists; for a DICOMweb URI, whether the service answers a study
    search there (raises :class:`ArchiveUnavailable` when it refuses the credentials)."""
    if is_dicomweb(uri):
        from medhier.io import dicomweb  # requests and dicomweb-client load only when a PACS is named

        return dicomweb.answers(uri, cfg or StorageConfig())
    fs, path = filesystem(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, cfg)
    fs.create_dir(path, recursive=True)


def delete(uri: str, cfg: StorageConfig | None = None) -> None:
    """Delete a file or a whole directory/prefix; a missing one is fine."""
    fs, path = filesystem(uri, cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_objects(
    uri: str,
    cfg: StorageConfig | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    page_size: int = 1000,
    excluded: list[str] | None = None,
) -> Iterator[list[ObjectInfo]]:
    """Stream the objects under ``uri`` as pages, never holding the whole listing.

    ``exclude``: glob patterns matched against the relative path (and its file name); matching
    objects are not yielded, and their relative paths are appended to ``excluded`` when given,
    so callers can count them. Raises FileNotFoundError when ``uri`` does not exist.

    A DICOMweb archive is listed through QIDO-RS (studies, then series, then instances; studies in
    ``cfg.list_threads`` parallel threads); series of ``cfg.dicomweb_exclude_modalities`` count
    as excluded. Raises :class:`ArchiveUnavailable` when the PACS does not answer.
    """
    cfg = cfg or StorageConfig()
    if is_dicomweb(uri):
        from medhier.io import dicomweb  # requests and dicomweb-client load only when a PACS is named

        source = dicomweb.list_instances(uri, cfg, excluded)
    elif is_s3(uri):
        source = _list_s3(uri, cfg)
    else:
        source = _list_local(normalize(uri))
    page: list[ObjectInfo] = []
    for info in source:
        if _excluded(info.path, exclude):
            if excluded is not None:
                excluded.append(info.path)
            continue
        page.append(info)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


def _excluded(rel: str, patterns) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _list_local(root: str) -> Iterator[ObjectInfo]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"archive folder {root!r} does not exist or is not a folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # vanished between listing and stat
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            yield ObjectInfo(rel, st.st_size, "", st.st_mtime)


def _list_s3(uri: str, cfg: StorageConfig) -> Iterator[ObjectInfo]:
    """List an S3 prefix: the first level with a delimiter, then every sub-prefix in parallel
    threads (S3 lists 1,000 keys per request; one sequential paginator tops out around a few
    thousand keys per second, which is hours for a large archive)."""
    bucket, prefix = _split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = s3_client(cfg)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        raise FileNotFoundError(f"archive bucket {bucket!r} is not reachable: {exc}") from None

    top = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    sub_prefixes: list[str] = []
    found = False
    for page in top:
        for obj in page.get("Contents", []):
            found = True
            if not obj["Key"].endswith("/"):
                yield _s3_info(obj, prefix)
        sub_prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    if not sub_prefixes:
        if not found:
            raise FileNotFoundError(f"archive {uri!r} has no objects")
        return

    yield from _list_prefixes(client, bucket, prefix, sub_prefixes, cfg.list_threads)


def _list_prefixes(client: Any, bucket: str, prefix: str, sub_prefixes: list[str], threads: int) -> Iterator[ObjectInfo]:
    """Every key under ``sub_prefixes``, listed by ``threads`` parallel threads and streamed as
    their pages come (a bounded queue keeps memory flat whatever the size)."""

    def produce(put: Callable[[Any], None], stop: threading.Event) -> None:
        def list_prefix(sub: str) -> None:
            try:
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=sub):
                    if stop.is_set():
                        return
                    put([_s3_info(o, prefix) for o in page.get("Contents", []) if not o["Key"].endswith("/")])
            except BaseException:
                stop.set()  # the other threads stop at their next page
                raise

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medhier-s3-list") as pool:
            list(pool.map(list_prefix, sub_prefixes))  # re-raises a thread's error

    for page in stream_threads(produce, maxsize=4 * threads, name="medhier-s3-prefixes"):
        yield from page


def _s3_info(obj: dict, prefix: str) -> ObjectInfo:
    return ObjectInfo(
        path=obj["Key"][len(prefix) :],
        size=int(obj["Size"]),
        etag=str(obj.get("ETag", "")).strip('"'),
        mtime=obj["LastModified"].timestamp(),
    )
