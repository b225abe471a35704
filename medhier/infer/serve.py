"""The online endpoint: one DICOM in, the model's answer out, on Ray Serve.

    POST {route}predict   body: the DICOM file (raw, or multipart form field ``file``)
    GET  {route}healthz   model_id, model_version, the task's self-description (the classifier's
                          taxonomy), batch-size counts of this replica

Each replica loads the checkpoint once (in a :class:`medhier.infer.actor.ModelActor`, the model
stage that archive scoring uses) and decodes and preprocesses every request itself, with the
checkpoint's DICOM and preprocessing settings, so that the endpoint sees exactly what training
and archive scoring saw. Concurrent requests share forward passes: ``@serve.batch`` groups
those that arrive within ``serve.batch_wait_timeout_s``, and every group that arrives while a
pass runs joins the next one, up to ``serve.max_batch_size`` images. Replicas autoscale between
``serve.min_replicas`` and ``serve.max_replicas`` on ongoing requests. The task words the
answer (the classifier: the report's main_label, main_prob, sub_label, ... from the same
function that makes report rows). Multipart uploads are parsed by python-multipart, through
Starlette.

Started by ``medhier serve --checkpoint URI`` through :func:`run`.
"""

import asyncio
import logging
import math
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from medhier import columns as C
from medhier.config import Config, ServeConfig
from medhier.infer.actor import ActorSettings, InferTask, ModelActor
from medhier.io import storage
from medhier.io.dicom import DicomRejected
from medhier.io.image import decode_images
from medhier.runtime import init_ray, verbose
from medhier.stopping import Stopped
from medhier.train.checkpoint import CHECKPOINT_FILE, config_for_checkpoint

__all__ = ["Endpoint", "ServeTask", "base_url", "build_app", "run", "shutdown"]

log = logging.getLogger(__name__)

BATCH_SIZE = "batch_size"  # images in the forward pass that answered this request
TIMING_MS = "timing_ms"  # {"decode", "model", "total"} milliseconds inside the replica
MIB = 1024 * 1024  # serve.max_upload_mb counts mebibytes

_DEFAULTS = ServeConfig()
_api = FastAPI(title="medhier", description="One DICOM image in, the model's answer out")


class ServeTask(InferTask, Protocol):
    """A task whose models answer one image per request."""

    def answer(self, cfg: Config, predictions: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        """Row ``i`` of a forward pass's prediction arrays -> the JSON answer's prediction fields."""


# Everything the routes call is defined above the deployment class: @serve.ingress copies the
# FastAPI app (through cloudpickle) when the class is decorated, and the copy's routes see only
# the module globals that existed at that moment.


class _Refused(Exception):
    """A request answered with an error status before any model work."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "message": self.message}, status_code=self.status)


async def _read_body(request: Request, max_upload_mb: float) -> bytes:
    """The request body, refusing more than ``max_upload_mb`` MiB: by the declared Content-Length
    before reading anything, and while streaming for chunked uploads, which declare none."""
    limit = int(max_upload_mb * MIB)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise _Refused(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            raise _too_large(f"{length:,} bytes", limit, max_upload_mb)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # stop reading: memory holds at most the limit and one chunk
            raise _too_large(f"more than {limit:,} bytes", limit, max_upload_mb)
    if not body:
        raise _Refused(400, "empty_body", "the request has no body: POST the DICOM file's bytes "
                       "(Content-Type: application/dicom) or a multipart form with the file in field 'file'")
    return bytes(body)


def _too_large(size: str, limit: int, max_upload_mb: float) -> _Refused:
    return _Refused(413, "upload_too_large", f"upload of {size} exceeds the limit of {limit:,} bytes "
                    f"(serve.max_upload_mb={max_upload_mb:g}); send one DICOM object per request")


async def _upload(request: Request, body: bytes) -> tuple[bytes, str]:
    """(DICOM bytes, a name for messages) from a raw body or a multipart/form-data body, which
    Starlette parses with python-multipart (the body is already read and bounded)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        # Raw: whatever the declared type (application/dicom, octet-stream, none, or curl's
        # default form type), the decoder decides whether the bytes are DICOM.
        return body, "request body"

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except (MultiPartException, HTTPException) as exc:
        raise _Refused(400, "bad_multipart", f"malformed multipart/form-data body: {getattr(exc, 'message', None) or exc.detail}") from None
    upload = form.get("file")
    if isinstance(upload, UploadFile):
        content = await upload.read()
        await form.close()
        if not content:
            raise _Refused(400, "empty_body", f"the multipart field 'file' ({upload.filename or 'no filename'}) is empty")
        return content, f"upload {upload.filename!r}" if upload.filename else "multipart field 'file'"
    await form.close()
    if upload is None and not _has_close_delimiter(body, content_type):
        # python-multipart keeps only the parts that ended: a cut-off upload loses its file
        raise _Refused(400, "bad_multipart", "multipart body ends before its closing boundary (truncated upload?)")
    raise _Refused(400, "missing_file", "the multipart form has no file field named 'file': send the DICOM as "
                   "-F file=@image.dcm, or as the raw body with Content-Type: application/dicom")


def _has_close_delimiter(body: bytes, content_type: str) -> bool:
    boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
    return bool(boundary) and f"--{boundary}--".encode("latin-1") in body


@serve.deployment(name="medhier")
@serve.ingress(_api)
class Endpoint:
    """One replica: the checkpoint's model (in a :class:`ModelActor`, the model stage archive
    scoring uses), its DICOM/preprocessing settings and a batch queue.

    ``cfg``: ``Config.to_dict()`` of the user's config (model-defining sections are replaced by
    the checkpoint's). ``checkpoint``: a checkpoint URI, local (absolute) or ``s3://``.
    ``task``: the checkpoint's task, which words the answers.
    """

    def __init__(self, cfg: dict[str, Any], checkpoint: str, task: ServeTask):
        user = Config.from_dict(cfg)
        serve_cfg = user.serve
        on_cpu = serve_cfg.replica_gpus == 0 or not torch.cuda.is_available()
        self.model = ModelActor(task, checkpoint, user.storage, ActorSettings(
            precision=user.score.precision,
            channels_last=user.train.channels_last,
            # torch would start one thread per core of the node, oversubscribing the CPUs that
            # other replicas and Ray tasks hold.
            threads=max(1, round(serve_cfg.replica_cpus)) if on_cpu else 0,
            compile=user.score.compile == "true",  # "auto" is about archive sizes: off here
            batch_size=serve_cfg.max_batch_size,
        ))
        self.task, loaded = task, self.model.loaded
        self.cfg = config_for_checkpoint(user, loaded)
        self.model_version = user.score.model_version or f"epoch-{loaded.epoch}"
        if self.cfg.dicom.frames == "all":
            # One request, one image: a multi-frame object is answered for its middle frame.
            self.cfg.dicom.frames = "middle"
        self.max_upload_mb = serve_cfg.max_upload_mb
        # The decorator's arguments are fixed when this module is imported; the config's come now.
        self._score_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)
        self.max_batch_size = serve_cfg.max_batch_size
        self.batch_sizes: Counter[int] = Counter()  # images per forward pass -> passes
        # Own threads for the two kinds of work: in asyncio's shared default pool a forward pass
        # would queue behind every request waiting to be decoded, and batches would stay small.
        # Decoding is CPU-bound: more threads than the replica's CPUs only contend.
        self._decode_pool = ThreadPoolExecutor(max(1, round(serve_cfg.replica_cpus)), thread_name_prefix="medhier-decode")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="medhier-model")
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []  # images for the next pass
        self._model_task: asyncio.Task | None = None

    @_api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Which model answers, what it predicts, and how this replica has batched so far."""
        return {
            "status": "ok",
            C.MODEL_ID: self.model.model_id,
            C.MODEL_VERSION: self.model_version,
            **self.model.loaded.task_meta,
            "image_size": self.model.image_size,
            "requests": sum(n * count for n, count in self.batch_sizes.items()),
            "batch_sizes": {str(n): count for n, count in sorted(self.batch_sizes.items())},
        }

    @_api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        """Score the posted DICOM: 200 with the prediction, 422 for a file medhier cannot decode,
        413 over serve.max_upload_mb, 400 for an empty or malformed request."""
        start = time.perf_counter()
        try:
            data, source = await _upload(request, await _read_body(request, self.max_upload_mb))
            image, meta, frame = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._prepare, data, source)
        except _Refused as refused:
            return refused.response()
        except DicomRejected as exc:
            return JSONResponse({"error": exc.reason, "message": exc.message}, status_code=422)
        decoded = time.perf_counter()
        answer = await (await self._score_batch(image))
        answer.update({
            C.SOP_INSTANCE_UID: meta[C.SOP_INSTANCE_UID],
            C.STUDY_INSTANCE_UID: meta[C.STUDY_INSTANCE_UID],
            C.SERIES_INSTANCE_UID: meta[C.SERIES_INSTANCE_UID],
            C.FRAME: frame,
            C.NUM_FRAMES: meta[C.NUM_FRAMES],
        })
        answer[TIMING_MS] = {
            "decode": round((decoded - start) * 1000, 3),  # reading the body, decode, resize
            "model": answer.pop("_model_ms"),  # the whole batch's forward pass
            "total": round((time.perf_counter() - start) * 1000, 3),
        }
        return JSONResponse(answer)

    def _prepare(self, data: bytes, source: str) -> tuple[np.ndarray, dict[str, Any], int]:
        """DICOM bytes -> (uint8 (S, S) model input, metadata, frame number); raises DicomRejected."""
        p = self.cfg.preprocess
        decoded, images = decode_images(data, self.cfg.dicom, p.image_size, p.resize, source=source)
        return images[0], decoded.meta, decoded.frames[0]

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _score_batch(self, images: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue a batch of (S, S) uint8 images for the model -> one future per image (its answer).

        Returns at once instead of awaiting the forward pass: Ray Serve forms the next batch
        while one runs, each only ``batch_wait_timeout_s`` long, so under load small batches
        would line up behind each other. Queued here, everything that arrived during a forward
        pass goes into the next one (up to ``serve.max_batch_size`` images).
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self._waiting.extend(zip(images, futures))
        if self._model_task is None or self._model_task.done():
            self._model_task = asyncio.create_task(self._run_model())
        return futures

    async def _run_model(self) -> None:
        """Forward passes until nothing waits; one at a time, in the model's own thread."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._model_pool, self.model.predict_images, np.stack([image for image, _ in batch]))
            except Exception as exc:  # the requests of this pass fail (HTTP 500); the next pass runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            model_ms = round((time.perf_counter() - start) * 1000, 3)
            self.batch_sizes[len(batch)] += 1
            for i, (_, future) in enumerate(batch):
                if not future.done():  # a client that went away cancels its future
                    future.set_result({**self._answer(out, i), BATCH_SIZE: len(batch), "_model_ms": model_ms})

    def _answer(self, out: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return {**self.task.answer(self.cfg, out, i), C.MODEL_ID: self.model.model_id, C.MODEL_VERSION: self.model_version}


def _route_prefix(route: str) -> str:
    return route.rstrip("/") or "/"


def _client_host(serve_cfg: ServeConfig) -> str:
    """The address a client on this machine reaches ``serve_cfg.host`` at (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(serve_cfg.host, serve_cfg.host)


def base_url(serve_cfg: ServeConfig) -> str:
    """``http://host:port{route}`` ending in "/": append ``predict`` or ``healthz``."""
    host = _client_host(serve_cfg)
    host = f"[{host}]" if ":" in host else host
    prefix = _route_prefix(serve_cfg.route)
    return f"http://{host}:{serve_cfg.port}{prefix.rstrip('/')}/"


def _logging_config() -> dict:
    """Serve's logs: INFO and an access line per request only with --verbose."""
    return {"log_level": "INFO" if verbose() else "WARNING", "enable_access_log": verbose()}


def build_app(cfg: Config, checkpoint: str, task: ServeTask):
    """The Serve application for ``checkpoint`` (a URI, local or s3://) of ``task``, sized by
    ``cfg.serve``: autoscaling replicas of ``replica_cpus``/``replica_gpus`` each, batching as
    configured."""
    if cfg.score.precision == "int8":  # refused here, not in a replica that retries in a loop
        raise ValueError("medhier serve: score.precision=int8 is calibrated on images sampled from an archive, which an "
                         "endpoint does not have; serve with score.precision=auto, bf16 or fp32")
    uri = storage.normalize(checkpoint)  # absolute: replicas run in other directories
    model_file = uri if uri.endswith(".pt") else storage.join(uri, CHECKPOINT_FILE)
    if not storage.exists(model_file, cfg.storage):  # here, not in a replica that retries in a loop
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (looked for {model_file})")
    s = cfg.serve
    return Endpoint.options(
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "initial_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        # Room for one full pass running and the next one filling, and above the autoscaling
        # target: Serve's default (5) would cap both the batch and the load the autoscaler sees.
        max_ongoing_requests=max(2 * s.max_batch_size, math.ceil(2 * s.target_ongoing_requests)),
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        # An access line per request only with --verbose: quiet logs by default.
        logging_config=_logging_config(),
    ).bind(cfg.to_dict(), uri, task)


def run(cfg: Config, checkpoint: str, task: ServeTask, *, blocking: bool = True, name: str = "medhier") -> str:
    """Serve ``checkpoint`` of ``task`` on ``cfg.serve.host:port`` under application ``name`` -> base URL.

    Starts (or joins) Ray from ``cfg.runtime`` when it is not initialised. Returns once every
    replica is up; with ``blocking`` it first waits for Ctrl-C and then shuts the app down.
    """
    if not ray.is_initialized():
        init_ray(cfg.runtime)
    app = build_app(cfg, checkpoint, task)
    url = base_url(cfg.serve)
    try:
        # HTTP options are fixed for the life of Serve on a cluster: a Serve already running
        # elsewhere keeps its own host and port (Ray logs a warning).
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=_logging_config())
        serve.run(app, name=name, route_prefix=_route_prefix(cfg.serve.route))
        if blocking:
            print(f"medhier: serving {checkpoint} at {url}predict (health: {url}healthz); Ctrl-C stops", file=sys.stderr)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C where medhier's stop signals are not installed (a library caller)
        if not blocking:
            raise
    except Stopped as stop:  # while starting or serving
        stop.note(f"nothing to commit: the endpoint at {url} is down")
        if not blocking:
            shutdown(name, cfg.serve)
        raise
    finally:
        if blocking:
            shutdown(name, cfg.serve)
    return url


def shutdown(name: str = "medhier", serve_cfg: ServeConfig | None = None, *, timeout_s: float = 30.0) -> None:
    """Delete application ``name``; stop Serve itself (its HTTP proxy) when no app is left.

    With ``serve_cfg`` (the host and port ``run`` served on), stopping Serve also waits until
    that port refuses connections: Ray reports a killed proxy dead before its process has
    exited, and a request in that gap gets a truncated answer, or a restart finds the port
    still bound.
    """
    try:
        serve.delete(name)
        remaining = serve.status().applications
    except Exception:  # Serve is not running: nothing to shut down
        log.debug("serve shutdown of %s: Serve not running", name, exc_info=True)
        return
    if remaining:
        return
    serve.shutdown()
    if serve_cfg is not None:
        _wait_closed(serve_cfg, timeout_s)


def _wait_closed(serve_cfg: ServeConfig, timeout_s: float) -> None:
    """Poll ``serve_cfg``'s host and port until a connection is refused, or warn after ``timeout_s``."""
    host = _client_host(serve_cfg)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, serve_cfg.port), timeout=1.0):
                pass
        except OSError:  # refused (or unreachable): nothing listens there any more
            return
        if time.monotonic() >= deadline:
            log.warning("Serve's HTTP proxy still accepts connections on %s:%s %.0f s after shutdown", host, serve_cfg.port, timeout_s)
            return
        time.sleep(0.1)
