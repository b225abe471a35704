"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and
``orthanc-dicomweb``), run as ``/usr/sbin/Orthanc CONFIG.json`` on 127.0.0.1 with its own storage
folder and ports, and stopped by its own process id (never the system service).

Orthanc checks credentials the way a hospital's gateway would: a Lua ``IncomingHttpRequestFilter``
admits requests carrying the session's bearer token (``MEDHIER_DICOMWEB_TOKEN``, set in
tests/conftest.py before Ray starts, so that decode tasks carry it too) or its basic credentials,
and answers 403 to every other request.

:meth:`Orthanc.load` puts an archive's files into it through Orthanc's own REST upload
(``POST /instances``, raw bytes: STOW-RS clients parse what they send, and broken files must
arrive as they are). Orthanc (DCMTK) refuses some broken files outright (HTTP 400), so the PACS
never holds them: of ``synthetic.spine.add_broken_files``'s seven, ``empty.dcm`` (empty),
``notes.txt`` (not DICOM), ``bad_header.dcm`` (an unknown VR in the file meta) and
``truncated.dcm`` (pixel data cut short) are refused; ``j2k_garbage.dcm``, ``mpeg2.dcm`` and
``report_sr.dcm`` are stored. The phantom gives ``j2k_garbage.dcm`` and ``mpeg2.dcm`` one SOP
Instance UID, which Orthanc would store once: when Orthanc answers "AlreadyStored", ``load``
gives the file a UID of its own (derived from its study, its UID and its path) and sends it again, so that each stored
file is its own instance.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
TOKEN_ENV = "MEDHIER_DICOMWEB_TOKEN"


def installed() -> bool:
    return os.access(ORTHANC, os.X_OK) and os.path.exists(PLUGIN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Loaded:
    """What :meth:`Orthanc.load` did, by archive path."""

    objects: dict[str, str] = field(default_factory=dict)  # stored: archive path -> listed path (study/series/sop)
    refused: dict[str, str] = field(default_factory=dict)  # archive path -> Orthanc's reason

    @property
    def studies(self) -> list[str]:
        return sorted({p.split("/")[0] for p in self.objects.values()})


class Orthanc:
    """One Orthanc process; :meth:`start` and :meth:`stop` may be called again (same storage,
    same ports): a PACS that goes away and comes back."""

    def __init__(self, root: Path, token: str):
        self.root, self.token = Path(root), token
        self.user, self.password = "medhier", secrets.token_hex(8)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        (self.root / "auth.lua").write_text(
            "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
            "  local auth = httpHeaders['authorization']\n"
            f"  return auth == 'Bearer {self.token}' or auth == 'Basic {basic}'\n"
            "end\n")
        (self.root / "orthanc.json").write_text(json.dumps({
            "Name": "medhier-test", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "LuaScripts": [str(self.root / "auth.lua")], "SaveJobs": False,
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }, indent=1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def uri(self) -> str:
        """The DICOMweb archive URI medhier takes."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout_s: float = 30.0) -> None:
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.root / 'orthanc.log'}")
            try:
                if requests.get(f"{self.url}/system", headers=self.headers, timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.root / 'orthanc.log'}")

    def stop(self) -> None:
        """Stop this process (SIGTERM to its pid, SIGKILL after 20 s) and wait until it is gone:
        its SQLite index must be free before a restart."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, data: bytes) -> tuple[bool, str]:
        """Orthanc's REST upload -> (stored, its status or refusal)."""
        r = requests.post(f"{self.url}/instances", data=data, headers=self.headers, timeout=30)
        if r.status_code == 200:
            return True, r.json().get("Status", "")
        return False, (r.json().get("Details") if r.headers.get("Content-Type", "").startswith("application/json") else r.text) or str(r.status_code)

    def load(self, root: str | Path, paths: list[str] | None = None) -> Loaded:
        """Upload an archive's DICOM candidates (every file but labels.csv, or ``paths``)."""
        root = Path(root)
        rels = paths if paths is not None else sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "labels.csv")
        loaded = Loaded()
        for rel in rels:
            data = (root / rel).read_bytes()
            ok, status = self.upload(data)
            if ok and status == "AlreadyStored":  # another file's UID: this file becomes its own instance
                ds = pydicom.dcmread(io.BytesIO(data))
                # from the file's own study and UID too: another archive's file of the same name must not collide
                own = pydicom.uid.generate_uid(entropy_srcs=["tests.orthanc", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), rel])
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = own
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, ds)
                data = buffer.getvalue()
                ok, status = self.upload(data)
            if ok:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                loaded.objects[rel] = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"
            else:
                loaded.refused[rel] = status
        return loaded


def start(root: Path) -> Orthanc:
    """A started Orthanc under ``root`` that admits the environment's bearer token."""
    pacs = Orthanc(root, os.environ[TOKEN_ENV])
    pacs.start()
    return pacs
