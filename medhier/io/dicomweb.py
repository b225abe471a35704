"""A PACS as a medhier archive, and as the destination of its results, over DICOMweb: QIDO-RS to
list, WADO-RS to fetch, STOW-RS to store, through dicomweb-client's ``DICOMwebClient``.

URI
---
``dicomweb+http(s)://host[:port]/prefix[?filters]`` names the DICOMweb service at
``http(s)://host[:port]/prefix`` (Orthanc's plugin: ``http://host:8042/dicom-web``). The filters
are QIDO-RS study-level matches, all of which a study must meet; one given in the URI replaces the
config key of the same meaning:

================================  ================================  ===================================
URI filter                        config key                        studies listed
================================  ================================  ===================================
``StudyDate=D`` or ``D1-D2``      ``storage.dicomweb_study_date``   on that date, or in that range
                                                                    (``-D2`` and ``D1-`` open-ended)
``ModalitiesInStudy=CT,MR``       ``storage.dicomweb_modalities``   with any of these modalities
``StudyInstanceUID=u1,u2``        ``storage.dicomweb_studies``      only these (a named study not
                                                                    found is logged as a warning)
================================  ================================  ===================================

Credentials in the URI are refused: the archive URI is written into summaries, caches and logs.

Listing
-------
Studies are searched page by page (``limit``/``offset``, ``storage.dicomweb_page_size``); each
study's series and then each series' instances are listed by one of ``storage.list_threads``
threads, pages streaming to the caller through a bounded queue (memory stays flat). Paging goes
on until a page comes back empty, so a server that caps its pages below the limit loses nothing;
a server that ignores ``offset`` (the same first result twice) is an error, not an endless loop.
Series whose Modality is in ``storage.dicomweb_exclude_modalities`` (SR, SEG, KO, PR by default:
medhier's own SRs land in the source's study) are listed as excluded, never as objects.

An instance is the object ``path = "<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>"``,
``etag`` = its SOPInstanceUID, ``size`` = ``mtime`` = 0 (QIDO-RS reports neither): the ledger
then knows an instance by its UIDs, and a re-run scores only the instances that arrived since.

Fetching
--------
WADO-RS Retrieve Instance as ``application/dicom`` in the transfer syntax it is stored in
(``transfer-syntax=*``): the PACS transcodes nothing, and medhier decodes compressed pixels as it
does from a folder. dicomweb-client hands over a pydicom dataset; it is written back to Part 10
bytes (elements never accessed stay raw, so the pixel data is the stored bytes).

Storing
-------
:func:`store` sends objects in one STOW-RS request and reads each one's outcome from the response
(Referenced SOP Sequence: stored, possibly with a warning; Failed SOP Sequence: the failure
reason). A request the server refuses as a whole (HTTP 400, 409, 415, 500, ...) is sent again one
object at a time, so that one bad object does not fail its neighbours. Storing an object whose
SOP Instance UID the PACS already holds replaces or keeps it, never duplicates it.

Authentication and TLS
----------------------
From environment variables only (never from the config, so never in a written config or log):

=================================  ==================================================================
``MEDHIER_DICOMWEB_TOKEN``         bearer token (``Authorization: Bearer ...``)
``MEDHIER_DICOMWEB_USER``,         HTTP basic authentication (both, and not with a token)
``MEDHIER_DICOMWEB_PASSWORD``
``MEDHIER_DICOMWEB_CA_BUNDLE``     a PEM file of the CAs to trust for https (default: certifi's,
                                   or ``REQUESTS_CA_BUNDLE``)
``MEDHIER_DICOMWEB_CLIENT_CERT``,  a client certificate (PEM) and its key for mutual TLS
``MEDHIER_DICOMWEB_CLIENT_KEY``
=================================  ==================================================================

On a Ray cluster the decode tasks fetch too: every node needs these variables (set them in the
nodes' environment from a secret store; a job's ``runtime_env`` ``env_vars`` also works, but is
shown to anyone who can read the job's details).

Errors
------
================================================  =================================================
what happened                                     what medhier does
================================================  =================================================
refused connection, timeout, HTTP 408, 429, 502,  retried ``storage.dicomweb_retries`` times with
503, 504                                          back-off from ``storage.dicomweb_backoff_s``
                                                  (doubling; a Retry-After header wins); then
                                                  :class:`~medhier.io.storage.ArchiveUnavailable`:
                                                  the job stops and commits nothing, so that no
                                                  instance is recorded as an error for an outage
HTTP 401, 403, 407                                ArchiveUnavailable naming the variables to check
an instance that is gone (HTTP 404, 410)          FileNotFoundError: that object's ``read_error`` row
another refusal of one instance (HTTP 400, 406,   OSError: that object's ``read_error`` row
500, ...) or bytes pydicom cannot parse
================================================  =================================================
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from medhier.io.storage import (
    ArchiveUnavailable,
    ObjectInfo,
    StorageConfig,
    StorageConfigError,
    check_dicomweb_filters,
    is_dicomweb,
)
from medhier.io.streaming import Producer, stream_threads

__all__ = [
    "ENV_CA_BUNDLE",
    "ENV_CLIENT_CERT",
    "ENV_CLIENT_KEY",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "Endpoint",
    "Stored",
    "answers",
    "client",
    "list_instances",
    "normalize",
    "parse",
    "reader",
    "split_path",
    "store",
]

log = logging.getLogger(__name__)

ENV_TOKEN = "MEDHIER_DICOMWEB_TOKEN"
ENV_USER = "MEDHIER_DICOMWEB_USER"
ENV_PASSWORD = "MEDHIER_DICOMWEB_PASSWORD"
ENV_CA_BUNDLE = "MEDHIER_DICOMWEB_CA_BUNDLE"
ENV_CLIENT_CERT = "MEDHIER_DICOMWEB_CLIENT_CERT"
ENV_CLIENT_KEY = "MEDHIER_DICOMWEB_CLIENT_KEY"
_ENV = (ENV_TOKEN, ENV_USER, ENV_PASSWORD, ENV_CA_BUNDLE, ENV_CLIENT_CERT, ENV_CLIENT_KEY)

# URI filter -> (config key it replaces, multi-valued)
_FILTERS = {"StudyDate": ("study_date", False), "ModalitiesInStudy": ("modalities", True), "StudyInstanceUID": ("studies", True)}
_RETRIED = (408, 429, 502, 503, 504)  # transient: a busy or restarting server
_CREDENTIALS = (401, 403, 407)
_GONE = (404, 410)
_ANY_SYNTAX = (("application/dicom", "*"),)  # WADO-RS: as stored, never transcoded
_UIDS_PER_QUERY = 50  # StudyInstanceUID list matching: keeps each query URL short
# STOW-RS failure reasons (PS3.18 Table I.2-1 and PS3.4 Annex B) -> what they mean.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA770: "out of resources (quota)",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


@dataclass(frozen=True)
class Endpoint:
    """A parsed DICOMweb URI: the service's URL and the QIDO-RS filters the URI sets (None: not
    set there, the config's value applies)."""

    url: str  # http(s)://host[:port]/prefix
    study_date: str | None = None
    modalities: tuple[str, ...] | None = None
    studies: tuple[str, ...] | None = None

    @property
    def uri(self) -> str:
        """The canonical URI: what :func:`normalize` returns and summaries record."""
        query = [(name, getattr(self, key) if not multi else ",".join(getattr(self, key)))
                 for name, (key, multi) in sorted(_FILTERS.items()) if getattr(self, key) is not None]
        return f"dicomweb+{self.url}" + (f"?{urlencode(query, safe=',-')}" if query else "")

    def filters(self, cfg: StorageConfig) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """-> (study date, modalities, study UIDs): the URI's where it sets them, else the config's."""
        return (self.study_date if self.study_date is not None else cfg.dicomweb_study_date,
                self.modalities if self.modalities is not None else tuple(m.upper() for m in cfg.dicomweb_modalities),
                self.studies if self.studies is not None else tuple(cfg.dicomweb_studies))


def parse(uri: str) -> Endpoint:
    """``dicomweb+http(s)://host[:port]/prefix[?filters]`` -> :class:`Endpoint`. Raises ValueError
    naming the URI and the problem (not DICOMweb, credentials in it, an unknown or malformed filter)."""
    if not is_dicomweb(uri):
        raise ValueError(f"{uri!r} is not a DICOMweb URI (dicomweb+http://host/prefix or dicomweb+https://...)")
    parts = urlsplit(uri[len("dicomweb+"):])
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"DICOMweb URI {parts.scheme}://{parts.hostname}...: credentials in a URI end up in summaries and logs; "
                         f"set {ENV_TOKEN}, or {ENV_USER} and {ENV_PASSWORD}, instead")
    if not parts.hostname:
        raise ValueError(f"DICOMweb URI {uri!r} names no host")
    if parts.fragment:
        raise ValueError(f"DICOMweb URI {uri!r}: a #fragment means nothing here")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    url = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
    values: dict[str, object] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _FILTERS:
            close = difflib.get_close_matches(name, list(_FILTERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known filters: {', '.join(_FILTERS)}"
            raise ValueError(f"DICOMweb URI {uri!r}: unknown filter {name!r}{hint}")
        key, multi = _FILTERS[name]
        if key in values:
            raise ValueError(f"DICOMweb URI {uri!r}: {name} given twice; list several values as {name}=a,b")
        values[key] = tuple(sorted({v.strip().upper() if key == "modalities" else v.strip() for v in value.split(",") if v.strip()})) if multi else value
    try:
        check_dicomweb_filters(f"DICOMweb URI {uri!r}: ", values.get("study_date", ""), list(values.get("modalities", ())),
                               list(values.get("studies", ())), names=("StudyDate", "ModalitiesInStudy", "StudyInstanceUID"))
    except StorageConfigError as exc:
        raise ValueError(str(exc)) from None
    return Endpoint(url, **values)


def normalize(uri: str) -> str:
    """A DICOMweb URI in its canonical spelling (lower-case scheme and host, no trailing /, sorted filters)."""
    return parse(uri).uri


def split_path(rel: str) -> tuple[str, str, str]:
    """A listed path -> (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID); ValueError otherwise."""
    parts = rel.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{rel!r} is not a DICOMweb object path (<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>)")
    return parts[0], parts[1], parts[2]


# -- the HTTP client ------------------------------------------------------------------------


def client(uri: str, cfg: StorageConfig) -> DICOMwebClient:
    """The DICOMweb client for ``uri``: a ``requests.Session`` with the credentials and TLS
    settings of the environment, retries with back-off, and a connection pool sized for the
    configured threads. One per process, service, settings and credentials."""
    settings = (cfg.dicomweb_timeout_s, cfg.dicomweb_retries, cfg.dicomweb_backoff_s,
                max(cfg.list_threads, cfg.read_threads, cfg.dicomweb_stow_threads) + 4)
    # the environment's credentials, hashed: a changed token gets a new session, and the cache
    # key holds no secret
    credentials = hashlib.sha256(json.dumps([os.environ.get(k, "") for k in _ENV]).encode()).hexdigest()
    return _client(parse(uri).url, settings, credentials)


@lru_cache(maxsize=16)
def _client(url: str, settings: tuple, credentials: str) -> DICOMwebClient:
    timeout_s, retries, backoff_s, pool = settings
    session = requests.Session()
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, backoff_factor=backoff_s,
                  status_forcelist=_RETRIED, allowed_methods=None,  # STOW too: storing a UID twice is harmless
                  raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    _authenticate(session)
    web = DICOMwebClient(url, session=session, timeout=timeout_s, permissive_uid=True)  # legacy UIDs: the PACS decides
    web.set_http_retry_params(retry=False)  # the session retries (connections too); twice would multiply
    return web


def _authenticate(session: requests.Session) -> None:
    token, user, password = (os.environ.get(k, "") for k in (ENV_TOKEN, ENV_USER, ENV_PASSWORD))
    if token and (user or password):
        raise ValueError(f"both {ENV_TOKEN} and {ENV_USER}/{ENV_PASSWORD} are set: set one way of authenticating")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user or password:
        if not (user and password):
            raise ValueError(f"{ENV_USER} and {ENV_PASSWORD} go together: set both, or {ENV_TOKEN} instead")
        session.auth = (user, password)
    ca_bundle, cert, key = (os.environ.get(k, "") for k in (ENV_CA_BUNDLE, ENV_CLIENT_CERT, ENV_CLIENT_KEY))
    for name, path in ((ENV_CA_BUNDLE, ca_bundle), (ENV_CLIENT_CERT, cert), (ENV_CLIENT_KEY, key)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{name}={path!r}: no such file")
    if ca_bundle:
        session.verify = ca_bundle
    if key and not cert:
        raise ValueError(f"{ENV_CLIENT_KEY} is set without {ENV_CLIENT_CERT}")
    if cert:
        session.cert = (cert, key) if key else cert


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def _unavailable(uri: str, exc: BaseException, cfg: StorageConfig, storing: bool = False) -> ArchiveUnavailable:
    status = _status(exc)
    if status in _CREDENTIALS:
        return ArchiveUnavailable(f"DICOMweb {uri}: HTTP {status}, the credentials were refused: check {ENV_TOKEN}, "
                                  f"or {ENV_USER} and {ENV_PASSWORD}, in the environment of every Ray node")
    what = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
    then = "nothing is known of what was sent" if storing else "nothing was recorded for its objects: run again when it answers"
    return ArchiveUnavailable(f"DICOMweb {uri} did not answer after {cfg.dicomweb_retries} retries ({what}); {then}")


def _paged(search: Callable[..., list[dict]], page_size: int, **kwargs) -> Iterator[dict]:
    """Every result of a QIDO-RS search, page by page, until an empty page."""
    offset, previous = 0, None
    while True:
        page = search(limit=page_size, offset=offset, **kwargs)
        if not page:
            return
        first = json.dumps(page[0], sort_keys=True)
        if first == previous:
            raise ValueError(f"the DICOMweb server answered offset={offset} with the page it gave for the offset before: "
                             "it ignores QIDO-RS paging; raise storage.dicomweb_page_size above its largest answer")
        previous = first
        yield from page
        offset += len(page)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


# -- listing --------------------------------------------------------------------------------


def list_instances(uri: str, cfg: StorageConfig, excluded: list[str] | None = None) -> Iterator[ObjectInfo]:
    """Stream the instances of the DICOMweb archive ``uri`` (see the module docstring) as
    ObjectInfo rows; the paths of instances in excluded series are appended to ``excluded``.
    Raises FileNotFoundError when no DICOMweb service answers there (HTTP 404) and
    ArchiveUnavailable when it does not answer or refuses the credentials."""
    endpoint = parse(uri)
    date, modalities, studies = endpoint.filters(cfg)
    web = client(uri, cfg)
    found: set[str] = set()
    try:
        for skipped, infos in stream_threads(_qido_producer(web, cfg, (date, modalities, studies), found),
                                             maxsize=4 * cfg.list_threads, name="medhier-qido-studies"):
            if not skipped:
                yield from infos
            elif excluded is not None:
                excluded.extend(i.path for i in infos)
    except requests.HTTPError as exc:
        if _status(exc) in _GONE:
            raise FileNotFoundError(f"no DICOMweb service at {endpoint.uri} (HTTP {_status(exc)}): check the host and prefix "
                                    "(Orthanc's is /dicom-web)") from None
        raise _unavailable(endpoint.uri, exc, cfg) from None
    except requests.RequestException as exc:
        raise _unavailable(endpoint.uri, exc, cfg) from None
    missing = sorted(set(studies) - found)
    if missing:
        log.warning("%s: %d of the %d studies named are not in the PACS or do not match the other filters, e.g. %s",
                    endpoint.uri, len(missing), len(studies), ", ".join(missing[:3]))


def _qido_producer(web: DICOMwebClient, cfg: StorageConfig, filters: tuple[str, tuple[str, ...], tuple[str, ...]],
                   found: set[str]) -> Producer:
    """The listing's producer for :func:`~medhier.io.streaming.stream_threads`: the matching
    studies, each listed (series, then instances, QIDO-RS paged) on a pool of ``list_threads``;
    puts ``(excluded, [ObjectInfo...])`` pages and adds the named studies it found to ``found``."""
    date, modalities, studies = filters
    skip = {m.upper() for m in cfg.dicomweb_exclude_modalities}

    def produce(put: Callable[[Any], None], stop: threading.Event) -> None:
        errors: list[BaseException] = []

        def list_study(study: str) -> None:
            try:
                for series in _paged(web.search_for_series, cfg.dicomweb_page_size, study_instance_uid=study):
                    if stop.is_set():
                        return
                    uid, modality = _value(series, "0020000E"), _value(series, "00080060").upper()
                    page = []
                    for instance in _paged(web.search_for_instances, cfg.dicomweb_page_size, study_instance_uid=study,
                                           series_instance_uid=uid):
                        sop = _value(instance, "00080018")
                        page.append(ObjectInfo(f"{study}/{uid}/{sop}", 0, sop, 0.0))
                        if len(page) >= cfg.dicomweb_page_size:
                            put((modality in skip, page))
                            page = []
                        if stop.is_set():
                            return
                    if page:
                        put((modality in skip, page))
            except BaseException as exc:  # raised by the producer once the pool is done
                errors.append(exc)
                stop.set()

        slots = threading.BoundedSemaphore(2 * cfg.list_threads)  # studies in flight: the listing streams
        with ThreadPoolExecutor(max_workers=cfg.list_threads, thread_name_prefix="medhier-qido") as pool:
            for study in _studies(web, date, modalities, studies, cfg.dicomweb_page_size):
                if stop.is_set():
                    break
                if studies:
                    found.add(study)
                slots.acquire()
                pool.submit(list_study, study).add_done_callback(lambda _: slots.release())
        if errors:
            raise errors[0]

    return produce


def _studies(web: DICOMwebClient, date: str, modalities: tuple[str, ...], studies: tuple[str, ...], page_size: int) -> Iterator[str]:
    """The StudyInstanceUIDs that match the filters, each once."""
    chunks = [",".join(studies[i:i + _UIDS_PER_QUERY]) for i in range(0, len(studies), _UIDS_PER_QUERY)] or [None]
    # one query per modality: a comma list means "any of" only for UIDs in QIDO-RS
    seen: set[str] | None = set() if len(modalities) > 1 else None
    for chunk in chunks:
        for modality in modalities or (None,):
            filters = {k: v for k, v in (("StudyDate", date), ("ModalitiesInStudy", modality), ("StudyInstanceUID", chunk)) if v}
            for study in _paged(web.search_for_studies, page_size, search_filters=filters):
                uid = _value(study, "0020000D")
                if seen is not None:
                    if uid in seen:
                        continue
                    seen.add(uid)
                yield uid


def answers(uri: str, cfg: StorageConfig) -> bool:
    """Whether a DICOMweb service answers a study search at ``uri`` (False on HTTP 404). Raises
    ArchiveUnavailable when it does not answer at all or refuses the credentials."""
    try:
        client(uri, cfg).search_for_studies(limit=1)
    except requests.HTTPError as exc:
        if _status(exc) in _GONE:
            return False
        raise _unavailable(normalize(uri), exc, cfg) from None
    except requests.RequestException as exc:
        raise _unavailable(normalize(uri), exc, cfg) from None
    return True


# -- fetching -------------------------------------------------------------------------------


def reader(uri: str, cfg: StorageConfig) -> Callable[[str], bytes]:
    """A function that fetches a listed instance (its path, see :func:`split_path`) with WADO-RS
    -> its Part 10 bytes. Errors: see the module docstring's table."""
    canonical, web = normalize(uri), client(uri, cfg)

    def read(rel: str) -> bytes:
        study, series, sop = split_path(rel)
        try:
            dataset = web.retrieve_instance(study, series, sop, media_types=_ANY_SYNTAX)
        except requests.HTTPError as exc:
            status = _status(exc)
            if status in _GONE:
                raise FileNotFoundError(f"{rel}: the PACS no longer has this instance (HTTP {status})") from None
            if status in _CREDENTIALS or status in _RETRIED:
                raise _unavailable(canonical, exc, cfg) from None
            raise OSError(f"{rel}: the PACS refused to send this instance (HTTP {status}: {exc.response.text[:200]})") from None
        except requests.RequestException as exc:
            raise _unavailable(canonical, exc, cfg) from None
        except Exception as exc:  # pydicom inside dicomweb-client: the bytes are not a DICOM file it can read
            raise OSError(f"{rel}: the PACS sent bytes pydicom cannot parse ({type(exc).__name__}: {exc})") from None
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset)
        return buffer.getvalue()

    return read


# -- storing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What became of one object sent with STOW-RS."""

    sop_instance_uid: str  # "" when the bytes were not DICOM
    stored: bool
    message: str = ""  # the server's warning or failure reason; "" when stored cleanly


def store(uri: str, objects: Sequence[bytes], cfg: StorageConfig) -> list[Stored]:
    """Store DICOM Part 10 ``objects`` in the PACS at ``uri`` with one STOW-RS request (more when
    the server refuses it as a whole: see the module docstring) -> one :class:`Stored` per
    object, in order. Raises ArchiveUnavailable when the PACS does not answer (after retries) or
    refuses the credentials: nothing is known then about any of them."""
    canonical, web = normalize(uri), client(uri, cfg)
    results: list[Stored | None] = [None] * len(objects)
    datasets: list[tuple[int, Dataset]] = []
    for i, data in enumerate(objects):
        try:
            datasets.append((i, pydicom.dcmread(io.BytesIO(data))))
        except Exception as exc:  # never sent: the server could only refuse it
            results[i] = Stored("", False, f"not a DICOM file pydicom can read ({type(exc).__name__}: {exc})")
    for i, outcome in _store(canonical, web, datasets, cfg):
        results[i] = outcome
    return results  # type: ignore[return-value]


def _store(uri: str, web: DICOMwebClient, datasets: list[tuple[int, Dataset]], cfg: StorageConfig) -> Iterator[tuple[int, Stored]]:
    if not datasets:
        return
    uids = [str(ds.get("SOPInstanceUID", "")) for _, ds in datasets]
    try:
        response = web.store_instances([ds for _, ds in datasets])
    except requests.HTTPError as exc:
        status = _status(exc)
        if status in _CREDENTIALS or status in _RETRIED:
            raise _unavailable(uri, exc, cfg, storing=True) from None
        if len(datasets) > 1:  # one bad object must not fail its neighbours
            for one in datasets:
                yield from _store(uri, web, [one], cfg)
            return
        yield datasets[0][0], Stored(uids[0], False, f"HTTP {status}: {_body(exc.response)}")
        return
    except requests.RequestException as exc:
        raise _unavailable(uri, exc, cfg, storing=True) from None
    outcomes = _outcomes(response)
    for (i, _), uid in zip(datasets, uids):
        # a 2xx without a per-instance answer (allowed for a bare 200) means all were stored
        yield i, outcomes.get(uid, Stored(uid, not outcomes, "" if not outcomes else "the server's answer does not mention it"))


def _outcomes(response: Dataset) -> dict[str, Stored]:
    """A STOW-RS response -> {SOP Instance UID: Stored} for the objects it names."""
    out = {}
    for item in response.get("ReferencedSOPSequence", []):
        uid, warning = str(item.ReferencedSOPInstanceUID), item.get("WarningReason")
        out[uid] = Stored(uid, True, f"stored with warning 0x{int(warning):04X}" if warning is not None else "")
    for item in response.get("FailedSOPSequence", []):
        uid, reason = str(item.ReferencedSOPInstanceUID), item.get("FailureReason")
        meaning = f"0x{int(reason):04X} {FAILURE_REASONS.get(int(reason), '')}".strip() if reason is not None else "no reason given"
        out[uid] = Stored(uid, False, f"refused by the PACS: {meaning}")
    return out


def _body(response: requests.Response | None) -> str:
    text = (response.text if response is not None else "").strip().replace("\n", " ")
    return " ".join(text.split())[:300] or "no details"
