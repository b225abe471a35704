"""Synthetic DICOM series with known geometry and pixel values, for the volume and SEG tests.

Slice k of a series lies at ``origin + k * dz * n`` with ``n = column cosines x row cosines``
(the slice normal of highdicom's volume convention), so a correct reader returns slice k as
volume slice k whatever order the files come in. Stored value of voxel (k, i, j):
``stored(k, i, j) = 1000 * k + 10 * i + j + 1`` (distinct everywhere).
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# A double-oblique plane: rows rotated 30 degrees about z, then the plane tilted 20 degrees.
_c30, _s30, _c20, _s20 = np.cos(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 9), np.sin(np.pi / 9)
OBLIQUE = (_c30, _s30, 0.0, -_s30 * _c20, _c30 * _c20, _s20)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def normal(orientation) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(col, row)


def stored_values(shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = np.indices(shape)
    return (1000 * z + 10 * y + x + 1).astype(np.uint16)


def series(
    shape: tuple[int, int, int] = (5, 6, 7),
    spacing: tuple[float, float, float] = (2.0, 0.5, 0.75),
    orientation=AXIAL,
    origin=(-10.0, 20.0, 30.0),
    *,
    key: str = "series",
    modality: str = "MR",
    rescale: tuple[float, float] | None = None,
    patient_id: str = "PAT-001",
    values: np.ndarray | None = None,
) -> list[Dataset]:
    """One single-frame dataset per slice, in slice order (k = 0 first), pixel data included.
    UIDs derive from ``key``, so equal keys give equal series."""
    dz, dy, dx = spacing
    n = normal(orientation)
    study_uid = generate_uid(entropy_srcs=["study", key])
    series_uid = generate_uid(entropy_srcs=["series", key])
    frame_uid = generate_uid(entropy_srcs=["frame", key])
    pixels = stored_values(shape) if values is None else values
    sop_class = MR_IMAGE if modality == "MR" else CT_IMAGE
    out = []
    for k in range(shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["instance", key, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = "Test^Patient"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = "20240305", "101500"
        ds.SeriesDate, ds.SeriesTime = "20240305", "102000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 7
        ds.SeriesDescription = f"T1w {key}"
        ds.Manufacturer = "medhier tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = shape[0] - k  # deliberately against slice order
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * dz * n]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.WindowCenter, ds.WindowWidth = 2000, 4000  # highdicom's enhanced converter wants a window
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def reread(ds: Dataset) -> Dataset:
    """The dataset as a reader sees it after a write (value types, file meta)."""
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def enhanced(datasets: list[Dataset], key: str = "enhanced") -> Dataset:
    """The single-frame series as one Legacy Converted Enhanced MR image (highdicom), frames in
    the given order, re-read from its bytes."""
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(entropy_srcs=["enhanced series", key]),
        series_number=8,
        sop_instance_uid=generate_uid(entropy_srcs=["enhanced instance", key]),
        instance_number=1,
    )
    return reread(image)
