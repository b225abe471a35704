"""Scoring a PACS and sending the SRs back, against a real Orthanc (tests/orthanc.py): one row
per instance, error rows for the broken ones, SRs found back through QIDO-RS and read with
highdicom, incremental runs, and a PACS that stops mid-run losing nothing."""

from __future__ import annotations

import io
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import pytest
import requests

from medhier import columns as C
from medhier.classify.report import SR_PATH
from medhier.classify.score import score, write_srs
from medhier.classify.sr import read_sr
from medhier.classify.task import CLASSIFY
from medhier.config import load_config
from medhier.infer.batch import Stage, report_table, score_archive
from medhier.infer.deliver import Delivery, Outbox
from medhier.io import dicomweb, storage
from medhier.synthetic import spine as synthetic
from tests.fitted import fitted_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.pacs]

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")
N = 10


def _cfg(*overrides: str):
    return load_config(SMOKE, ["runtime.progress=false", "score.batch_size=8", "data.decode_batch_size=8", *overrides])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Phantom archives in folders: the first PACS's (with broken files), 2 instances that
    arrive later, and the outage test's -> {name: (folder, broken)}."""
    out = {}
    for name, seed, n, broken in (("main", 61, N, True), ("later", 62, 2, False), ("outage", 63, 6, False)):
        root = tmp_path_factory.mktemp(f"pacs-{name}")
        synthetic.generate_archive(str(root), n, seed=seed, size=64, compressed_fraction=0.3)
        out[name] = (root, synthetic.add_broken_files(str(root), seed=seed) if broken else {})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, phantoms):
    return fitted_checkpoint(str(tmp_path_factory.mktemp("pacs-ckpt")), _cfg(), str(phantoms["main"][0]), seed=0, steps=15, epoch=3)


def _archive(orthanc, *loaded) -> str:
    """The PACS, restricted to these loads' studies (the session's Orthanc is shared)."""
    studies = sorted({s for load in loaded for s in load.studies})
    return f"{orthanc.uri}?StudyInstanceUID={','.join(studies)}"


def _srs_in_pacs(orthanc, studies: list[str]) -> dict[str, bytes]:
    """SOP Instance UID -> bytes of every SR the PACS holds in these studies (QIDO-RS, WADO-RS)."""
    cfg = load_config().storage
    web, read = dicomweb.client(orthanc.uri, cfg), storage.reader(orthanc.uri, cfg)
    found = {}
    for study in studies:
        for series in web.search_for_series(study, search_filters={"Modality": "SR"}):
            uid = series["0020000E"]["Value"][0]
            for instance in web.search_for_instances(study, uid):
                sop = instance["00080018"]["Value"][0]
                found[sop] = read(f"{study}/{uid}/{sop}")
    return found


def test_scoring_a_pacs_sends_the_srs_back_and_then_scores_only_what_arrived(orthanc, phantoms, checkpoint, ray_session, tmp_path):
    started = time.time()
    root, broken = phantoms["main"]
    loaded = orthanc.load(root)
    later_root, _ = phantoms["later"]
    # the instances that arrive later are in studies of their own, named in the archive URI from the start
    archive = _archive(orthanc, loaded) + "," + ",".join(_studies_of(later_root))
    out = str(tmp_path / "out")

    first = score(_cfg(), archive, checkpoint, out, sr_to=orthanc.uri)
    rows = report_table(out).to_pylist()
    # One row per instance the PACS holds; Orthanc refused four broken files outright (see
    # tests/orthanc.py), so they have no row: the listing is what the PACS holds.
    assert sorted(loaded.refused) == ["broken/bad_header.dcm", "broken/empty.dcm", "broken/notes.txt", "broken/truncated.dcm"]
    assert Counter(r[C.PATH] for r in rows) == Counter({p: 1 for p in loaded.objects.values()})
    assert {r[C.PATH]: r["error_reason"] for r in rows if r[C.STATUS] == "error"} == \
        {loaded.objects[rel]: broken[rel] for rel in loaded.objects if rel.startswith("broken/")}
    ok = [r for r in rows if r[C.STATUS] == "ok"]
    assert len(ok) == N and all(r[C.ETAG] == r[C.SOP_INSTANCE_UID] and r[C.PATH].endswith(r[C.ETAG]) for r in ok)
    (sent,) = first.deliveries
    assert (sent["pending"], sent["stored"], sent["failed"], sent["earlier"]) == (N, N, 0, 0)

    # the SRs are in the PACS, in their sources' studies, once each, and read back with highdicom
    in_pacs = _srs_in_pacs(orthanc, loaded.studies)
    assert len(in_pacs) == N
    for r in ok:
        written = Path(out, r[SR_PATH]).read_bytes()
        sop = str(hd.sr.srread(io.BytesIO(written)).SOPInstanceUID)
        back = hd.sr.srread(io.BytesIO(in_pacs[sop]))
        assert isinstance(back, hd.sr.Comprehensive3DSR) and back.StudyInstanceUID == r[C.STUDY_INSTANCE_UID]
        result = read_sr(in_pacs[sop])
        assert result["referenced_sop_instance_uid"] == r[C.SOP_INSTANCE_UID]
        assert (result["main_label"], result["sub_label"]) == (r["main_label"], r["sub_label"])
    status = Outbox(out, load_config().storage).status()
    assert status.num_rows == N and set(status["status"].to_pylist()) == {"stored"}

    # nothing new: nothing scored, nothing sent; the SRs now in the studies are excluded, not scored
    second = score(_cfg(), archive, checkpoint, out, sr_to=orthanc.uri)
    assert (second.files, second.already_scored, second.excluded) == (0, len(loaded.objects), N)
    assert second.deliveries[0]["pending"] == 0

    # two instances arrive: they alone are scored and reported
    later = orthanc.load(later_root)
    third = score(_cfg(), archive, checkpoint, out, sr_to=orthanc.uri)
    assert third.files == 2 and third.deliveries[0]["stored"] == 2
    assert Counter(report_table(out, columns=[C.PATH])[C.PATH].to_pylist()) == \
        Counter({p: 1 for p in [*loaded.objects.values(), *later.objects.values()]})
    assert len(_srs_in_pacs(orthanc, later.studies)) == 2

    _assert_secret_kept(out, started)


def _studies_of(root: Path) -> list[str]:
    import pydicom

    return sorted({str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in Path(root).rglob("*.dcm")})


def _assert_secret_kept(out: str, since: float) -> None:
    """The bearer token is in no output file (reports, ledger, configs, summaries, SRs, delivery
    records) and in no Ray log written since ``since`` (the driver's, the workers', the actors')."""
    token = os.environ["MEDHIER_DICOMWEB_TOKEN"].encode()
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("deliveries" in p.parts for p in files)
    assert not [p for p in files if token in p.read_bytes()]
    logs = [p for p in Path(tempfile.gettempdir(), "ray").glob("session_*/logs/**/*") if p.is_file() and p.stat().st_mtime >= since]
    assert logs and not [p for p in logs if token in p.read_bytes()]


def _stop_pacs(batch, run, pid: int, url: str):
    """A stage that kills the PACS (by its process id) and waits until it refuses connections."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(100):
        try:
            requests.get(url, timeout=0.2)
        except requests.ConnectionError:
            break
        time.sleep(0.05)
    return batch


class PacsDiesAfterCommit:
    """The classifier, except that the PACS is killed right after the report's commit: before
    the SRs are sent."""

    def __init__(self, pid: int):
        self.pid = pid

    def __getattr__(self, name):
        return getattr(CLASSIFY, name)

    def after_commit(self, cfg, ledger, model_id, version):
        CLASSIFY.after_commit(cfg, ledger, model_id, version)
        os.kill(self.pid, signal.SIGKILL)


def test_a_pacs_that_stops_mid_run_loses_nothing(orthanc, phantoms, checkpoint, ray_session, tmp_path):
    loaded = orthanc.load(phantoms["outage"][0])
    n = len(loaded.objects)
    archive, out = _archive(orthanc, loaded), str(tmp_path / "out")
    cfg = _cfg("storage.dicomweb_retries=1", "storage.dicomweb_backoff_s=0.05")
    send = (Delivery(SR_PATH, orthanc.uri),)

    # 1. The PACS dies while the run fetches (the SR stage reads the sources again): the run
    # fails and commits nothing, rather than record instances as errors.
    stop = Stage(_stop_pacs, {"pid": orthanc.process.pid, "url": orthanc.url})
    with pytest.raises(storage.ArchiveUnavailable, match="did not answer after 1 retries"):  # the CLI's one line, exit 1
        score_archive(cfg, archive, checkpoint, out, CLASSIFY, stages=(stop, Stage(write_srs)), deliveries=send)
    assert not Path(out, "report").exists() and not Path(out, "ledger").exists()
    orthanc.stop()
    orthanc.start()

    # 2. It dies after the commit, before the SRs are sent: the report stands, the SRs wait.
    second = score_archive(cfg, archive, checkpoint, out, PacsDiesAfterCommit(orthanc.process.pid), stages=(Stage(write_srs),),
                           deliveries=send)
    assert second.files == n and second.deliveries[0]["failed"] == n and second.deliveries[0]["stored"] == 0
    assert "not sent" in second.deliveries[0]["examples"][0] and second.undelivered == n
    assert _srs_in_pacs_after_restart(orthanc, loaded) == {}

    # 3. Back up: the next run scores nothing and sends every SR the last one could not, once.
    third = score(cfg, archive, checkpoint, out, sr_to=orthanc.uri)
    assert third.files == 0 and (third.deliveries[0]["stored"], third.deliveries[0]["earlier"], third.deliveries[0]["failed"]) == (n, n, 0)
    assert Counter(report_table(out, columns=[C.PATH])[C.PATH].to_pylist()) == Counter({p: 1 for p in loaded.objects.values()})
    srs = _srs_in_pacs(orthanc, loaded.studies)
    written = {str(hd.sr.srread(io.BytesIO(Path(out, r[SR_PATH]).read_bytes())).SOPInstanceUID)
               for r in report_table(out).to_pylist()}
    assert set(srs) == written and len(written) == n
    attempts = Outbox(out, cfg.storage).table()
    assert Counter(attempts["status"].to_pylist()) == {"failed": n, "stored": n}


def _srs_in_pacs_after_restart(orthanc, loaded) -> dict[str, bytes]:
    orthanc.stop()
    orthanc.start()
    return _srs_in_pacs(orthanc, loaded.studies)
