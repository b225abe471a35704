"""The online endpoint over real HTTP: answers equal the Scorer's, rejections carry their reason,
uploads are bounded, and concurrent requests share forward passes without mixing answers up."""

from __future__ import annotations

import csv
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.classify.taxonomy import Taxonomy
from medhier.config import load_config
from medhier.infer.actor import ActorSettings, ModelActor
from medhier.io.image import decode_images
from medhier.synthetic import spine as synthetic
from medhier.train.checkpoint import amend_checkpoint, load_checkpoint
from tests.fitted import fitted_checkpoint

pytestmark = pytest.mark.ray

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")
N = 24  # phantoms: one per concurrent request
MAX_UPLOAD_MB = 0.1  # a 64 px phantom is ~9 KB
TIMEOUT = 60  # seconds per HTTP request; the first one waits for nothing but the replica


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEMPERATURES = {"main": 1.8, "sub": 0.6}  # far from 1: calibrated answers differ visibly from the model's own


def _make_checkpoint(directory: str, root: str, files: list[str]) -> str:
    """The fitted checkpoint, calibrated and with a referral threshold as ``medhier train``
    leaves every checkpoint: the median calibrated leaf probability of ``files[:4]``, so that
    two of them are referred and two not."""
    fitted_checkpoint(directory, load_config(SMOKE), root, seed=0, steps=8, epoch=3)
    amend_checkpoint(directory, task_meta={"temperatures": TEMPERATURES})
    loaded = load_checkpoint(directory, CLASSIFY)
    images = [decode_images(Path(root, path).read_bytes(), loaded.cfg.dicom, loaded.cfg.preprocess.image_size)[1][0] for path in files[:4]]
    out = ModelActor(CLASSIFY, directory, loaded.cfg.storage, ActorSettings(precision="fp32")).predict_images(np.stack(images))
    leaf_prob = out["p_leaf"][np.arange(4), out["pred_leaf"]]
    amend_checkpoint(directory, defaults={"score": {"refer_below": float(np.median(leaf_prob))}})
    return directory


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve-archive"))
    synthetic.generate_archive(root, N, seed=5, size=64, compressed_fraction=0.3, monochrome1_fraction=0.2)
    broken = synthetic.add_broken_files(root, seed=5)
    files = [row["path"] for row in csv.DictReader(open(Path(root, "labels.csv")))]
    return root, files, broken


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, archive):
    return _make_checkpoint(str(tmp_path_factory.mktemp("serve-ckpt")), archive[0], archive[1])


@pytest.fixture(scope="module")
def expected(archive, checkpoint):
    """What archive scoring's model actor says about every phantom: path -> (sop_instance_uid, p_main, p_leaf)."""
    root, files, _ = archive
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    images, uids = [], []
    for path in files:
        decoded, (image,) = decode_images(Path(root, path).read_bytes(), loaded.cfg.dicom, loaded.cfg.preprocess.image_size,
                                          loaded.cfg.preprocess.resize)
        images.append(image)
        uids.append(decoded.meta["sop_instance_uid"])
    out = ModelActor(CLASSIFY, checkpoint, loaded.cfg.storage, ActorSettings(precision="fp32")).predict_images(np.stack(images))
    return {path: (uid, out["p_main"][i], out["p_leaf"][i]) for i, (path, uid) in enumerate(zip(files, uids))}


@pytest.fixture(scope="module")
def scored(archive, checkpoint, ray_session, tmp_path_factory):
    """The archive scored as ``medhier score --sr`` scores it -> the output folder, before the
    endpoint starts (``url`` asks for this): the run does not wait for a Serve replica's CPU."""
    from medhier.classify.score import score

    out = str(tmp_path_factory.mktemp("serve-scores") / "scores")
    score(load_config(SMOKE, ["runtime.progress=false", "score.precision=fp32"]), archive[0], checkpoint, out, sr=True)
    return out


@pytest.fixture(scope="module")
def url(ray_session, checkpoint, scored):
    from ray import serve

    from medhier.infer.serve import run, shutdown

    cfg = load_config(SMOKE, [
        "runtime.progress=false", "score.precision=fp32",  # fp32: answers comparable to 1e-5
        f"serve.port={_free_port()}", f"serve.max_upload_mb={MAX_UPLOAD_MB}",
        "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05",
    ])
    base = run(cfg, checkpoint, CLASSIFY, blocking=False, name="medhier-test")
    yield base
    shutdown("medhier-test", cfg.serve)  # the last app: stops Serve's HTTP proxy too, and waits for its port
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "healthz", timeout=5)
    serve.shutdown()  # whatever happened above, nothing of Serve outlives this module


def _post(url: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(url + "predict", data=data, headers={"Content-Type": "application/dicom"}, timeout=TIMEOUT, **kwargs)


def _check_answer(body: dict, uid: str, p_main: np.ndarray, p_leaf: np.ndarray, tax: Taxonomy) -> None:
    assert body["sop_instance_uid"] == uid and body["frame"] == 0
    np.testing.assert_allclose([body["leaf_probs"][n] for n in tax.leaf_names], p_leaf, atol=1e-5)
    np.testing.assert_allclose([body["main_probs"][m] for m in tax.mains], p_main, atol=1e-5)
    # hierarchical: the leaf lies in the main class, P(leaf) = P(main) x P(sub | main)
    assert body["leaf_label"] == f"{body['main_label']}/{body['sub_label']}"
    assert body["sub_label"] in tax.subs[tax.mains.index(body["main_label"])]
    assert body["leaf_prob"] == pytest.approx(body["main_prob"] * body["sub_prob"], rel=1e-5)
    assert body["leaf_prob"] == pytest.approx(body["leaf_probs"][body["leaf_label"]])


def test_a_phantom_is_answered_as_the_scorer_answers_it(url, archive, checkpoint, expected):
    root, files, _ = archive
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    uid, p_main, p_leaf = expected[files[0]]
    response = _post(url, Path(root, files[0]).read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    _check_answer(body, uid, p_main, p_leaf, taxonomy_of(loaded))
    assert body["model_id"] == loaded.model_id and body["model_version"] == "epoch-3"
    assert 0 < body["timing_ms"]["decode"] <= body["timing_ms"]["total"]


def test_one_image_gets_one_p_sub_given_main_in_the_report_the_sr_and_the_endpoint(url, archive, checkpoint, scored):
    """P(sub | main) is the model's own conditional output, the same number wherever it is read
    (medhier 0.1 divided in the report, clamped in the SR and answered 0 in serve); with the
    checkpoint's temperatures applied once for all three, and one referral decision."""
    from medhier.classify.calibration import Temperatures, temper
    from medhier.classify.presets import eval_preset
    from medhier.classify.sr import read_sr
    from medhier.infer.batch import report_table

    root, files, _ = archive
    out = scored
    rows = {r["path"]: r for r in report_table(out).to_pylist() if r["status"] == "ok"}
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    tax, threshold = taxonomy_of(loaded), loaded.defaults["score"]["refer_below"]
    for path in files[:4]:
        row = rows[path]
        served = _post(url, Path(root, path).read_bytes()).json()
        in_sr = read_sr(Path(out, row["sr_path"]).read_bytes())
        assert row["sub_label"] == served["sub_label"] == in_sr["sub_label"]
        # The endpoint runs the model on other batches than scoring (float32 sums differ in the
        # last bits: 1e-6 was seen); the SR is written from the report's own row.
        assert row["sub_prob"] == pytest.approx(served["sub_prob"], abs=1e-5)
        assert row["sub_prob"] == pytest.approx(in_sr["sub_prob"], abs=1e-6)
        assert row["leaf_prob"] == pytest.approx(served["leaf_prob"], abs=1e-5)
        assert row["leaf_prob"] == pytest.approx(in_sr["leaf_prob"], abs=1e-6)
        assert 0 < row["sub_prob"] <= 1
        # calibrated: the model's own outputs with the checkpoint's temperatures, computed here
        _, (image,) = decode_images(Path(root, path).read_bytes(), loaded.cfg.dicom, loaded.cfg.preprocess.image_size)
        with torch.no_grad():
            own = loaded.model(eval_preset(loaded.cfg.preprocess)(torch.from_numpy(image)[None]))
        _, log_p_sub, log_p_leaf = temper(own.log_p_main, own.log_p_sub, Temperatures(**TEMPERATURES), tax)
        leaf = tax.leaf_names.index(row["leaf_label"])
        assert row["leaf_prob"] == pytest.approx(float(log_p_leaf[0, leaf].exp()), abs=1e-5)
        assert row["sub_prob"] == pytest.approx(float(log_p_sub[0, leaf].exp()), abs=1e-5)
        assert row["leaf_prob"] != pytest.approx(float(own.log_p_leaf[0, leaf].exp()), abs=1e-3)
        # one referral: the checkpoint's threshold, in all three
        assert row["refer"] is served["refer"] is in_sr["refer"] is (row["leaf_prob"] < threshold)
    assert {rows[path]["refer"] for path in files[:4]} == {True, False}


def test_multipart_upload_and_raw_body_give_the_same_answer(url, archive):
    root, files, _ = archive
    data = Path(root, files[1]).read_bytes()
    raw = _post(url, data)
    octet = requests.post(url + "predict", data=data, headers={"Content-Type": "application/octet-stream"}, timeout=TIMEOUT)
    form = requests.post(url + "predict", files={"file": ("IM0001.dcm", data, "application/dicom")}, timeout=TIMEOUT)
    assert raw.status_code == octet.status_code == form.status_code == 200, form.text
    answers = [r.json() for r in (raw, octet, form)]
    for a in answers:
        del a["timing_ms"], a["batch_size"]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("name, reason", [
    ("broken/truncated.dcm", "corrupt_pixels"),
    ("broken/notes.txt", "not_dicom"),
    ("broken/report_sr.dcm", "no_pixels"),
    ("broken/bad_header.dcm", "corrupt_header"),
])
def test_a_file_medhier_cannot_decode_gets_422_with_its_reason(url, archive, name, reason):
    root, _, broken = archive
    assert broken[name] == reason
    for response in (_post(url, Path(root, name).read_bytes()),
                     requests.post(url + "predict", files={"file": (name, Path(root, name).read_bytes())}, timeout=TIMEOUT)):
        assert response.status_code == 422
        body = response.json()
        assert body["error"] == reason and body["message"]


def test_empty_and_malformed_requests_are_client_errors_that_say_what_to_send(url):
    empty = _post(url, b"")
    assert empty.status_code == 400 and empty.json()["error"] == "empty_body"
    assert "multipart" in empty.json()["message"] and "application/dicom" in empty.json()["message"]
    wrong_field = requests.post(url + "predict", files={"image": ("a.dcm", b"DICM")}, timeout=TIMEOUT)
    assert wrong_field.status_code == 400 and wrong_field.json()["error"] == "missing_file"
    assert "'file'" in wrong_field.json()["message"]


def _form(boundary: str, *parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


FILE_PART = b'Content-Disposition: form-data; name="file"; filename="a.dcm"\r\nContent-Type: application/dicom\r\n\r\n'


@pytest.mark.parametrize("content_type, body, error, says", [
    # what python-multipart (through Starlette) refuses
    ("multipart/form-data", _form("xyz", FILE_PART + b"DICM"), "bad_multipart", "boundary"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nno headers, no blank line, no end", "bad_multipart", "Invalid multipart"),
    ("multipart/form-data; boundary=xyz", _form("xyz", b'Content-Disposition: form-data\r\n\r\nno name'), "bad_multipart", "name"),
    ("multipart/form-data; boundary=xyz", _form("xyz", FILE_PART + b"one", FILE_PART + b"two"), "bad_multipart", "Too many files"),
    # cut off inside the file part: the part never ended, so no file arrived
    ("multipart/form-data; boundary=xyz", _form("xyz", FILE_PART + b"DICM half a file", close=False)[:-2], "bad_multipart", "truncated"),
    # well-formed, but not what the endpoint needs
    ("multipart/form-data; boundary=xyz", _form("xyz", b'Content-Disposition: form-data; name="file"\r\n\r\ntext'), "missing_file", "'file'"),
    ("multipart/form-data; boundary=xyz", _form("xyz", FILE_PART), "empty_body", "is empty"),
])
def test_malformed_multipart_bodies_are_400_naming_the_problem(url, content_type, body, error, says):
    response = requests.post(url + "predict", data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error and says in response.json()["message"]


def test_an_upload_over_the_limit_gets_413_and_the_endpoint_keeps_serving(url, archive):
    root, files, _ = archive
    too_big = b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 + 1)
    declared = _post(url, too_big)  # Content-Length says so: refused before reading
    assert declared.status_code == 413 and declared.json()["error"] == "upload_too_large"
    assert "serve.max_upload_mb=0.1" in declared.json()["message"]

    def chunks():  # chunked transfer: no Content-Length, the size shows only while reading
        for start in range(0, len(too_big), 16384):
            yield too_big[start : start + 16384]

    chunked = _post(url, chunks())
    assert chunked.status_code == 413 and chunked.json()["error"] == "upload_too_large"
    assert _post(url, Path(root, files[2]).read_bytes()).status_code == 200


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_answer(url, archive, checkpoint, expected):
    root, files, _ = archive
    tax = taxonomy_of(load_checkpoint(checkpoint, CLASSIFY))
    bodies = {path: Path(root, path).read_bytes() for path in files}
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        responses = dict(zip(files, pool.map(lambda path: _post(url, bodies[path]), files)))
    for path, response in responses.items():
        assert response.status_code == 200, response.text
        _check_answer(response.json(), *expected[path], tax)
    assert len({r.json()["leaf_label"] for r in responses.values()}) >= 2  # answers differ per image
    assert max(r.json()["batch_size"] for r in responses.values()) > 1

    health = requests.get(url + "healthz", timeout=TIMEOUT).json()
    sizes = {int(n): count for n, count in health["batch_sizes"].items()}
    assert max(sizes) > 1 and max(sizes) <= 8  # serve.max_batch_size
    assert health["requests"] >= N


def test_healthz_names_the_model_and_its_taxonomy(url, checkpoint):
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    health = requests.get(url + "healthz", timeout=TIMEOUT)
    assert health.status_code == 200
    body = health.json()
    assert body["model_id"] == loaded.model_id and body["model_version"] == "epoch-3"
    assert body["taxonomy"] == taxonomy_of(loaded).to_dict()
    assert body["leaves"] == list(taxonomy_of(loaded).leaf_names)


def test_a_missing_checkpoint_fails_before_anything_is_deployed(tmp_path):
    from medhier.infer.serve import build_app

    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_app(load_config(SMOKE), str(tmp_path / "nowhere"), CLASSIFY)


def test_stopping_waits_until_the_port_refuses_connections(caplog):
    """Ray reports a killed proxy dead before its process lets go of the port: shutdown waits for it."""
    import threading
    import time

    from medhier.config import ServeConfig
    from medhier.infer.serve import _wait_closed

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    closed_at: list[float] = []

    def close_later() -> None:
        time.sleep(0.5)
        closed_at.append(time.monotonic())
        listener.close()

    closer = threading.Thread(target=close_later)
    closer.start()
    _wait_closed(ServeConfig(host="0.0.0.0", port=port), timeout_s=30)
    assert closed_at, "returned while the port still accepted connections"
    closer.join()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    with socket.create_server(("127.0.0.1", 0)) as still_open:
        port = still_open.getsockname()[1]
        _wait_closed(ServeConfig(host="127.0.0.1", port=port), timeout_s=0.3)
    assert f"still accepts connections on 127.0.0.1:{port}" in caplog.text


def test_the_url_for_a_wildcard_host_is_the_loopback_address():
    from medhier.config import ServeConfig
    from medhier.infer.serve import base_url

    assert base_url(ServeConfig(host="0.0.0.0", port=8000)) == "http://127.0.0.1:8000/"
    assert base_url(ServeConfig(host="::", port=8000, route="/v1")) == "http://[::1]:8000/v1/"
    assert base_url(ServeConfig(host="10.0.0.5", port=9000)) == "http://10.0.0.5:9000/"


def test_sigterm_stops_medhier_serve_with_one_line_and_no_ray_process_left(checkpoint):
    """As a scheduler stops it: the signal to the command's process alone. Before medhier handled
    it, Ray's handler printed a stack trace and aborted, and the DashboardAgent and
    RuntimeEnvAgent of the Ray it had started stayed behind, orphaned."""
    import signal

    from tests.processes import descendants, gone_after, medhier, stop, wait_until

    port = _free_port()
    args = ["serve", "--checkpoint", checkpoint, "--port", str(port), "--config", SMOKE, "runtime.progress=false",
            "runtime.local_num_cpus=4"]
    process = medhier(*args)

    def answering() -> bool:
        assert process.poll() is None, process.communicate()
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok
        except requests.RequestException:  # not listening yet, or the replica not up
            return False

    wait_until(answering, timeout=240, every=1.0, what="the endpoint to answer")
    ray_processes = descendants(process.pid)
    assert any("DashboardAgent" in cmd for cmd in ray_processes.values()), ray_processes
    assert any("RuntimeEnvAgent" in cmd for cmd in ray_processes.values()), ray_processes
    code, stdout, stderr = stop(process, signal.SIGTERM)
    assert code == 143
    assert stderr.strip().splitlines()[-1] == (
        f"medhier serve: stopped by SIGTERM. Committed: nothing to commit: the endpoint at http://127.0.0.1:{port}/ is down. "
        f"To continue, re-run: medhier {' '.join(args)}")
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr
    assert not gone_after(ray_processes), "Ray processes outlived medhier serve"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
