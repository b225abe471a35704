"""What every phantom generator writes alike: derived UIDs, DICOM values and files, archives.

The spine CT (:mod:`medhier.synthetic.spine`) and carotid MR (:mod:`medhier.synthetic.carotid`)
generators draw different anatomy but write it the same way, and must stay byte-identical for
the same seed, so the shared pieces live here once:

- :func:`derived_uid`: UIDs from names (``generate_uid`` with entropy sources), never random;
- :func:`decimal_string`: a DS value within DICOM's 16 characters;
- :func:`image_elements`: the elements every phantom image carries whatever its modality
  (character set, manufacturer, patient position, one 16-bit sample per pixel, lossless);
- :func:`file_meta` and :func:`part10_bytes`: an image's file meta (Explicit VR Little Endian,
  stamped ``MEDHIER_SYNTH``) and the Part 10 bytes of a dataset;
- :func:`write_files`: an archive's files written by a pool of threads, with bounded memory;
- :func:`check_seed`: the one rule for a seed (an integer >= 0).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medhier.config import StorageConfig
from medhier.io import storage

__all__ = [
    "MANUFACTURER",
    "check_seed",
    "decimal_string",
    "derived_uid",
    "file_meta",
    "image_elements",
    "part10_bytes",
    "write_files",
]

MANUFACTURER = "medhier-phantom"


def check_seed(seed: int) -> int:
    """``seed`` as an int; ValueError unless it is an integer >= 0."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def derived_uid(namespace: str, *parts: object) -> str:
    """A UID derived from ``namespace`` and ``parts`` (each as str): the same names give the
    same UID, so an archive is byte-identical for the same arguments."""
    return str(generate_uid(entropy_srcs=[namespace, *map(str, parts)]))


def decimal_string(x: float) -> str:
    """A decimal string (DS) within DICOM's 16 characters."""
    return f"{float(x):.10g}"[:16]


def image_elements() -> Dataset:
    """A new dataset holding the elements every phantom image shares, whatever its modality."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.LossyImageCompression = "00"
    return ds


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """The file meta of a phantom image stored as Explicit VR Little Endian (pydicom's
    ``Dataset.compress`` replaces the transfer syntax when it encodes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDHIER_SYNTH"
    return meta


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` (with its file meta) as the bytes of a DICOM Part 10 file."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_files(root: str, files: Iterable[tuple[str, bytes]], cfg: StorageConfig, name: str) -> list[int]:
    """Write each ``(path relative to root, bytes)`` of ``files`` under ``root`` (a folder or
    s3:// prefix) from a pool of threads named ``name`` -> each file's size in bytes, in order.

    ``files`` is consumed as the writes complete: at most 4 files per thread wait in memory."""
    threads = cfg.read_threads if storage.is_s3(root) else min(8, cfg.read_threads)
    sizes = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name) as writer:
        pending: set[Future] = set()
        for rel, data in files:
            sizes.append(len(data))
            pending.add(writer.submit(storage.write_bytes, storage.join(root, rel), data, cfg))
            if len(pending) >= 4 * threads:  # bound the bytes held in memory
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
        for future in pending:
            future.result()
    return sizes
