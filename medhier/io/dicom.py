"""DICOM bytes -> displayable float32 pixels and pseudonymous metadata, or a typed rejection.

This module imports neither Ray nor torch, so it can be tested on any file in milliseconds.

The pixel pipeline follows the DICOM grayscale pipeline with pydicom's own transforms:
stored values -> modality LUT (rescale slope/intercept or Modality LUT Sequence) -> VOI (a window
from the config, the file's window or VOI LUT, or the image's percentiles) -> [0, 1] -> inverted
for MONOCHROME1, so 0 is always black.  Colour images become one grey channel (ITU-R BT.601
luma).  For 8- and 16-bit integer data the whole chain is evaluated once per distinct set of
parameters over every possible stored value and applied as a lookup table: the values are
exactly pydicom's, at the cost of one gather per image.

Raw patient identifiers (name, ID, birth date, accession number) never leave this module: the
metadata carries a salted, keyed hash of the patient ID instead.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from medhier import columns as C
from medhier.config import DicomConfig, window_from_spec
from medhier.io.rejection import Rejection

__all__ = ["Decoded", "DicomRejected", "REASONS", "decode", "patient_key", "read_dataset"]

# Rejection reason codes (stable: they are report values) -> what they mean.
REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM file (no DICM preamble and no parseable dataset)",
    "corrupt_header": "the DICOM header could not be parsed",
    "no_pixels": "the object has no pixel data (e.g. SR, RT plan, DICOMDIR, waveform)",
    "unsupported_syntax": "no decoder is available for the transfer syntax",
    "unsupported_image": "pixel attributes that cannot be interpreted",
    "corrupt_pixels": "the pixel data is truncated or corrupt",
    "too_large": "more pixels than dicom.max_pixels allows",
    "non_finite": "the pixel values contain NaN or infinity",
}

DEFAULT_PATIENT_SALT = "medhier-default-salt:set-MEDHIER_PATIENT_SALT"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the Y of YBR_FULL
_NO_PIXEL_TYPES = {  # SOP classes that never carry images, for a friendlier message
    "SR": "structured report",
    "RTPLAN": "RT plan",
    "RTSTRUCT": "RT structure set",
    "ECG": "waveform",
}


class DicomRejected(Rejection):
    """A file medhier cannot turn into an image. ``reason`` is a code from :data:`REASONS`."""

    reasons = REASONS


@dataclass(frozen=True)
class Decoded:
    """A decoded image.

    ``pixels``: float32 (n_frames, rows, columns) in [0, 1], 0 = black, one entry per selected
    frame. ``frames``: the 0-based frame numbers of those entries in the source object.
    ``meta``: pseudonymous metadata keyed by :mod:`medhier.columns` names plus ``window_center``,
    ``window_width`` and ``window_function`` (the VOI actually applied, when one was).
    """

    pixels: np.ndarray
    frames: tuple[int, ...]
    meta: dict[str, Any]


def decode(data: bytes, cfg: DicomConfig | None = None, *, source: str = "") -> Decoded:
    """Decode one DICOM object held in memory.

    ``data``: the whole file's bytes. ``source``: a name for messages (e.g. the object's path).
    Raises :class:`DicomRejected` for anything that does not yield a trustworthy image.
    """
    with warnings.catch_warnings():
        # pydicom warns about every odd value in old files; odd is normal in archives, and what
        # matters is reported through DicomRejected or the returned metadata.
        warnings.simplefilter("ignore")
        return _decode(data, cfg or DicomConfig(), source)


def _decode(data: bytes, cfg: DicomConfig, source: str) -> Decoded:
    ds = _read_dataset(data, source)
    meta = _metadata(ds, cfg, source)

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = _NO_PIXEL_TYPES.get(meta[C.MODALITY], meta[C.MODALITY] or "unknown modality")
        raise DicomRejected("no_pixels", f"{source or 'object'} has no pixel data ({kind})")

    rows, cols, samples = _geometry(ds, source)
    n_frames = meta[C.NUM_FRAMES]
    frames = _select_frames(n_frames, cfg.frames)
    n_pixels = rows * cols * samples * len(frames)
    if n_pixels > cfg.max_pixels:
        raise DicomRejected(
            "too_large",
            f"{source or 'object'}: {rows}x{cols}x{samples} x {len(frames)} frame(s) = "
            f"{n_pixels:,} pixels > dicom.max_pixels={cfg.max_pixels:,}",
        )

    decoder = _decoder_for(ds, source)
    window: dict[str, Any] | None = None  # chosen on the first frame, reused unless per-frame
    out: list[np.ndarray] = []
    for i, frame in enumerate(frames):
        stored, photometric = _decode_frame(decoder, ds, frame, n_frames, source)
        frame_ds = _frame_view(ds, frame)
        try:
            pixels, window = _to_display(stored, photometric, frame_ds, cfg, source, window)
        except DicomRejected:
            raise
        except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError, IndexError) as exc:
            # pydicom's LUT and colour transforms reject malformed attributes this way
            raise DicomRejected(
                "unsupported_image", f"{source or 'object'}: frame {frame}: {type(exc).__name__}: {exc}"
            ) from None
        if pixels.shape != (rows, cols):
            raise DicomRejected("unsupported_image", f"{source or 'object'}: frame {frame} decodes to {pixels.shape}, not {rows}x{cols}")
        out.append(pixels)
        if i == 0:
            meta.update({k: v for k, v in window.items() if not k.startswith("_")})
    # One frame (the common case) is a view, not a copy: this runs once per image of an archive.
    stack = out[0][None] if len(out) == 1 else np.stack(out)
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise DicomRejected("non_finite", f"{source or 'object'}: pixel values contain NaN or infinity")
    return Decoded(pixels=stack, frames=tuple(frames), meta=meta)


def patient_key(patient_id: str, issuer: str = "", salt: str = "") -> str:
    """Salted keyed hash (HMAC-SHA256, 20 hex digits) of a patient ID; "" for an empty ID.

    The same salt must be used wherever keys are compared (labels manifests, splits, reports).
    """
    if not patient_id:
        return ""
    key = (salt or os.environ.get("MEDHIER_PATIENT_SALT") or DEFAULT_PATIENT_SALT).encode()
    msg = f"{issuer}\x00{patient_id}".encode("utf-8", "surrogateescape")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:20]


# -- reading -------------------------------------------------------------------------------


def read_dataset(data: bytes, *, source: str = "", pixels: bool = True) -> Dataset:
    """Parse one DICOM object held in memory -> its pydicom Dataset, checked as :func:`decode`
    checks it (preamble or a plausible raw dataset, every top-level element parsed, not cut
    short, a transfer syntax recorded). ``pixels=False`` stops before the pixel data (an SR's
    or a volume's header). Every medhier module that needs a DICOM header gets it here.

    Raises :class:`DicomRejected` (``not_dicom``, ``corrupt_header``, ``corrupt_pixels``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd values are normal in archives; see decode()
        return _read_dataset(data, source, pixels=pixels)


def _read_dataset(data: bytes, source: str, pixels: bool = True) -> Dataset:
    name = source or "object"
    if not data:
        raise DicomRejected("not_dicom", f"{name} is empty (0 bytes)")
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dataset(data):
        raise DicomRejected("not_dicom", f"{name}: no DICM preamble and no DICOM data element at the start")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble, stop_before_pixels=not pixels)
        # Parse every top-level element now so that a broken header fails here, cleanly.
        elements = list(ds.keys())
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError, NotImplementedError) as exc:
        reason = "corrupt_header" if has_preamble else "not_dicom"
        raise DicomRejected(reason, f"{name}: {type(exc).__name__}: {exc}") from None
    if not elements:
        raise DicomRejected("not_dicom" if not has_preamble else "corrupt_header", f"{name}: no data elements")
    _check_not_truncated(ds, name, pixels)
    _ensure_transfer_syntax(ds)
    return ds


def _check_not_truncated(ds: Dataset, name: str, pixels: bool = True) -> None:
    """pydicom stops quietly where a file ends early; the last element it read then holds fewer
    bytes than its declared length. Checking that one element costs microseconds, where
    parsing every value would double the decode time."""
    last = ds._dict[max(ds._dict)]  # elements are read in tag order: the last one read
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        if last.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            raise DicomRejected("corrupt_pixels", f"{name}: pixel data truncated ({len(value):,} of {length:,} bytes)")
        raise DicomRejected("corrupt_header", f"{name}: file ends inside element {last.tag} ({len(value)} of {length} bytes)")
    # (A header read without its pixels has no pixel data by request.)
    if pixels and not any(k in ds for k in _PIXEL_KEYWORDS) and "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds:
        # An image's attributes without its pixels: the file was cut before the pixel data.
        raise DicomRejected("corrupt_pixels", f"{name}: image attributes present but no pixel data (truncated file?)")


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A file without preamble must at least start with a group 0002 or 0008 element tag."""
    if len(data) < 8:
        return False
    return int.from_bytes(data[:2], "little") in (0x0002, 0x0008) or int.from_bytes(
        data[:2], "big"
    ) in (0x0002, 0x0008)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (or without a TransferSyntaxUID) are native: record the encoding
    pydicom actually read them with, so that the pixel decoder knows it."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    uid = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else pydicom.uid.ExplicitVRLittleEndian
        if little
        else pydicom.uid.ExplicitVRBigEndian
    )
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _metadata(ds: Dataset, cfg: DicomConfig, source: str) -> dict[str, Any]:
    def text(keyword: str) -> str:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed value must not hide the image
            return ""
        return "" if value is None else str(value).strip()

    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise DicomRejected(
            "unsupported_image", f"{source or 'object'}: NumberOfFrames is not a number ({exc})"
        ) from None
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return {
        C.SOP_INSTANCE_UID: text("SOPInstanceUID"),
        C.STUDY_INSTANCE_UID: text("StudyInstanceUID"),
        C.SERIES_INSTANCE_UID: text("SeriesInstanceUID"),
        C.MODALITY: text("Modality").upper(),
        C.BODY_PART: text("BodyPartExamined").upper(),
        C.PATIENT_KEY: patient_key(text("PatientID"), text("IssuerOfPatientID"), cfg.patient_salt),
        C.NUM_FRAMES: max(n_frames, 1),
        C.ROWS: int(ds.get("Rows") or 0),
        C.COLUMNS: int(ds.get("Columns") or 0),
        C.PHOTOMETRIC: text("PhotometricInterpretation").upper(),
        C.TRANSFER_SYNTAX: str(tsyntax),
    }


# -- pixels --------------------------------------------------------------------------------


def _geometry(ds: Dataset, source: str) -> tuple[int, int, int]:
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise DicomRejected("unsupported_image", f"{source or 'object'}: missing {', '.join(missing)}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if rows <= 0 or cols <= 0 or samples not in (1, 3):
        raise DicomRejected(
            "unsupported_image",
            f"{source or 'object'}: Rows={rows}, Columns={cols}, SamplesPerPixel={samples}",
        )
    if "PhotometricInterpretation" not in ds:
        # A few old files omit it; grey is the only sensible reading of one sample.
        if samples != 1:
            raise DicomRejected("unsupported_image", f"{source or 'object'}: colour image without PhotometricInterpretation")
        ds.PhotometricInterpretation = "MONOCHROME2"
    return rows, cols, samples


def _select_frames(n_frames: int, policy: str) -> list[int]:
    if policy == "all":
        return list(range(n_frames))
    if policy == "first":
        return [0]
    return [n_frames // 2]  # middle: the frame most likely to show the anatomy of interest


def _decoder_for(ds: Dataset, source: str):
    if "PixelData" not in ds:  # float pixel data is always native
        return get_decoder(pydicom.uid.ExplicitVRLittleEndian)
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise DicomRejected("unsupported_syntax", f"{source or 'object'}: no transfer syntax and it could not be inferred")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomRejected(
            "unsupported_syntax", f"{source or 'object'}: no decoder for transfer syntax {tsyntax} ({tsyntax.name})"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {', '.join(v)}" for k, v in decoder.missing_dependencies.items()) if hasattr(decoder, "missing_dependencies") else ""
        raise DicomRejected(
            "unsupported_syntax",
            f"{source or 'object'}: transfer syntax {tsyntax.name} needs a plugin that is not installed ({missing})",
        )
    return decoder


def _decode_frame(decoder, ds: Dataset, frame: int, n_frames: int, source: str) -> tuple[np.ndarray, str]:
    """-> (stored values for one frame: (rows, cols) or (rows, cols, 3), photometric after decode)."""
    try:
        arr, info = decoder.as_array(ds, index=frame if n_frames > 1 else None)
    except Exception as exc:  # every decoder failure is a property of this file's pixels
        raise DicomRejected(
            "corrupt_pixels", f"{source or 'object'}: frame {frame}: {type(exc).__name__}: {exc}"
        ) from None
    if arr.ndim == 4 or (arr.ndim == 3 and int(ds.get("SamplesPerPixel") or 1) == 1):
        arr = arr[0]  # a single frame was asked for
    return arr, str(info.get("photometric_interpretation", ds.PhotometricInterpretation)).upper()


def _to_display(
    stored: np.ndarray, photometric: str, ds: Dataset, cfg: DicomConfig, source: str, window: dict[str, Any] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values -> float32 [0, 1] grey (0 = black), plus the window that was applied.

    ``window``: the previous frame's, reused so that all frames of an object share one window,
    except file windows, which enhanced multi-frame objects may define per frame.
    """
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise DicomRejected("non_finite", f"{source or 'object'}: pixel values contain NaN or infinity")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _grey(stored, photometric, ds, cfg, window)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except Exception as exc:
            raise DicomRejected("unsupported_image", f"{source or 'object'}: palette colour LUT: {exc}") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _luma(rgb, 2**bits - 1), _window("color", None, None, None)
    if photometric == "RGB" and stored.ndim == 3:
        return _luma(stored, 2 ** int(ds.BitsStored) - 1), _window("color", None, None, None)
    if photometric.startswith("YBR") and stored.ndim == 3:
        # Still in a YCbCr space (e.g. YBR_ICT/RCT left as is): Y is the luma already.
        full = 2 ** int(ds.BitsStored) - 1
        return (stored[..., 0].astype(np.float32) / full).clip(0, 1), _window("color", None, None, None)
    raise DicomRejected(
        "unsupported_image",
        f"{source or 'object'}: photometric interpretation {photometric!r} with array shape {stored.shape}",
    )


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    return (rgb.astype(np.float32) @ _LUMA.astype(np.float32) / np.float32(full_scale)).clip(0, 1)


def _grey(
    stored: np.ndarray, photometric: str, ds: Dataset, cfg: DicomConfig, window: dict[str, Any] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    if window is None or window[C.WINDOW_SOURCE] == "file":
        window = _choose_window(stored, ds, cfg)
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        index = stored.view(np.dtype(f"u{stored.dtype.itemsize}"))
        lut = _lut(stored.dtype, ds, window)
        out = np.take(lut, index)
    else:  # 32-bit or float data: too many distinct values for a table
        out = _chain(stored, ds, window)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False), window


def _choose_window(stored: np.ndarray, ds: Dataset, cfg: DicomConfig) -> dict[str, Any]:
    """Walk ``cfg.window_order`` and return the first window that applies to this image."""
    modality = str(ds.get("Modality", "")).upper()
    for src in list(cfg.window_order) + ["minmax"]:
        if src == "config" and modality in {k.upper() for k in cfg.windows}:
            spec = {k.upper(): v for k, v in cfg.windows.items()}[modality]
            center, width = window_from_spec(spec, where=f"dicom.windows.{modality}")
            return _window(f"config:{modality}", center, width, "LINEAR")
        if src == "file" and _file_voi_usable(ds):
            index = min(cfg.file_window_index, _n_file_windows(ds) - 1)
            entry = _window("file", None, None, None)
            if not ds.get("VOILUTSequence"):
                centers, widths = ds["WindowCenter"], ds["WindowWidth"]
                entry.update(
                    window_center=float(centers.value[index] if centers.VM > 1 else centers.value),
                    window_width=float(widths.value[index] if widths.VM > 1 else widths.value),
                    window_function=str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR",
                )
            entry["_index"] = index
            return entry
        if src in ("percentile", "minmax"):
            low, high = cfg.percentiles if src == "percentile" else (0.0, 100.0)
            sample = stored[::4, ::4] if stored.size > 65536 else stored
            values = apply_modality_lut(sample, ds)
            lo, hi = np.percentile(values, [low, high])
            width = max(float(hi - lo), 1e-6)
            return _window(src, float(lo + hi) / 2, width, "LINEAR_EXACT")
    raise AssertionError("minmax always applies")


def _window(source: str, center, width, function) -> dict[str, Any]:
    return {
        C.WINDOW_SOURCE: source,
        "window_center": center,
        "window_width": width,
        "window_function": function,
    }


def _n_file_windows(ds: Dataset) -> int:
    if ds.get("VOILUTSequence"):
        return len(ds.VOILUTSequence)
    return int(ds["WindowCenter"].VM)


def _file_voi_usable(ds: Dataset) -> bool:
    try:
        if ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[0]
            return "LUTDescriptor" in item and "LUTData" in item
        if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
            return False
        widths = ds.WindowWidth if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            return False
        # pydicom (and the standard) need width >= 1 for LINEAR, > 0 otherwise.
        return all(float(w) >= 1 if function == "LINEAR" else float(w) > 0 for w in widths)
    except (TypeError, ValueError, AttributeError):
        return False  # a malformed window is as good as none: fall through to the next source


def _chain(values: np.ndarray, ds: Dataset, window: dict[str, Any]) -> np.ndarray:
    """Modality LUT -> VOI -> [0, 1] for an array of stored values (float64 -> float32)."""
    modality_out = apply_modality_lut(values, ds)
    voi_ds = _voi_dataset(ds, window)
    with np.errstate(over="ignore", invalid="ignore"):
        out = apply_voi_lut(modality_out, voi_ds, index=window.get("_index", 0), prefer_lut=True)
        lo, hi = _voi_output_range(voi_ds, window)
    return ((np.asarray(out, dtype=np.float64) - lo) / (hi - lo)).clip(0, 1).astype(np.float32)


def _voi_dataset(ds: Dataset, window: dict[str, Any]) -> Dataset:
    """The dataset pydicom's VOI functions should see: the file's own VOI, or our window in it."""
    if window[C.WINDOW_SOURCE] == "file":
        return ds
    voi = Dataset()
    for keyword in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "PhotometricInterpretation"):
        if keyword in ds:
            voi[keyword] = ds[keyword]
    if "PixelRepresentation" not in voi:  # float pixel data has none; its values are signed
        voi.PixelRepresentation = 1
    voi.PhotometricInterpretation = "MONOCHROME2"  # inversion is ours, after the VOI
    voi.WindowCenter = window["window_center"]
    voi.WindowWidth = window["window_width"]
    voi.VOILUTFunction = window["window_function"]
    return voi


def _voi_output_range(voi_ds: Dataset, window: dict[str, Any]) -> tuple[float, float]:
    """The output range of the VOI transform, as pydicom defines it, to map onto [0, 1]."""
    if voi_ds.get("VOILUTSequence") and window[C.WINDOW_SOURCE] == "file":
        item = voi_ds.VOILUTSequence[window.get("_index", 0)]
        return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    # Windowing maps everything below the window to its minimum output and everything above to
    # its maximum; ask pydicom's own function for the two ends instead of re-deriving them.
    ends = pydicom.pixels.apply_windowing(np.array([-1e300, 1e300]), voi_ds, window.get("_index", 0))
    return float(ends[0]), float(ends[1])


def _lut(dtype: np.dtype, ds: Dataset, window: dict[str, Any]) -> np.ndarray:
    """Lookup table over every value of an 8/16-bit dtype, indexed by the unsigned bit pattern."""
    key = _lut_key(dtype, ds, window)
    if key is None:  # LUT-based modality or VOI transforms: build each time (still one pass)
        return _build_lut(dtype, ds, window)
    return _cached_lut(key, dtype.str, ds, window)


def _lut_key(dtype: np.dtype, ds: Dataset, window: dict[str, Any]):
    if ds.get("ModalityLUTSequence") or (window[C.WINDOW_SOURCE] == "file" and ds.get("VOILUTSequence")):
        return None
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (
        dtype.str,
        int(ds.get("BitsStored") or 0),
        int(ds.get("PixelRepresentation") or 0),
        None if slope is None else float(slope),
        None if intercept is None else float(intercept),
        window["window_center"],
        window["window_width"],
        window["window_function"],
    )


_LUT_CACHE: dict[tuple, np.ndarray] = {}
_LUT_CACHE_SIZE = 64


def _cached_lut(key: tuple, dtype_str: str, ds: Dataset, window: dict[str, Any]) -> np.ndarray:
    lut = _LUT_CACHE.get(key)
    if lut is None:
        lut = _build_lut(np.dtype(dtype_str), ds, window)
        if len(_LUT_CACHE) >= _LUT_CACHE_SIZE:
            _LUT_CACHE.pop(next(iter(_LUT_CACHE)))  # oldest first
        _LUT_CACHE[key] = lut
    return lut


def _build_lut(dtype: np.dtype, ds: Dataset, window: dict[str, Any]) -> np.ndarray:
    n = 1 << (8 * dtype.itemsize)
    values = np.arange(n, dtype=np.dtype(f"u{dtype.itemsize}")).view(dtype)
    return _chain(values, ds, window)


# -- enhanced multi-frame objects -----------------------------------------------------------


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """For enhanced multi-frame objects, lift the frame's rescale and window from the functional
    group sequences to the top level, where pydicom's transforms look for them."""
    groups = []
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(keyword)
        if not seq:
            continue
        if keyword.startswith("PerFrame"):
            if frame < len(seq):
                groups.append(seq[frame])
        else:
            groups.append(seq[0])
    if not groups:
        return ds
    view = None
    for group in groups:  # shared first, per-frame overrides
        for seq_kw, attrs in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            item = group.get(seq_kw)
            if not item:
                continue
            for attr in attrs:
                if attr in item[0]:
                    if view is None:
                        view = _shallow_copy(ds)
                    view[attr] = item[0][attr]
    return view or ds


def _shallow_copy(ds: Dataset) -> Dataset:
    copy = Dataset()
    for elem in ds:
        if elem.keyword not in _PIXEL_KEYWORDS:
            copy.add(elem)
    copy.file_meta = ds.file_meta
    return copy
