"""Decoded pixels -> the uint8 images every model input starts from (CPU, once per image).

    DICOM bytes ──io.dicom.decode──▶ float32 [0, 1] frames ──resize (pad|stretch|crop)──▶ uint8 (S, S)

This one path feeds the ingest (cache and scoring), Grad-CAM and the online endpoint, so all
three see exactly the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from medhier.config import DicomConfig
from medhier.io.dicom import Decoded, decode

__all__ = ["decode_images", "resize_image", "to_uint8"]


def resize_image(pixels: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """(H, W) float32 in [0, 1] -> (size, size) float32.

    ``pad``: scale the longer side to ``size`` and centre on black (keeps anatomy's proportions);
    ``stretch``: scale both sides to ``size``; ``crop``: scale the shorter side, centre-crop.
    Downscaling is antialiased (Pillow widens its filter support by the scale factor).
    """
    h, w = pixels.shape
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    if mode == "stretch":
        return np.asarray(image.resize((size, size), Image.BILINEAR))
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return resized[top : top + size, left : left + size]
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (0..255), rounded. 256 grey levels after windowing lose nothing a
    classifier can use, and make the cache 4x smaller than float32."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_images(data: bytes, dicom_cfg: DicomConfig, size: int, mode: str = "pad", *, source: str = "") -> tuple[Decoded, list[np.ndarray]]:
    """DICOM bytes -> (the decoded object, one (size, size) uint8 image per selected frame).

    Raises :class:`medhier.io.dicom.DicomRejected` for a file that does not yield an image."""
    decoded = decode(data, dicom_cfg, source=source)
    return decoded, [to_uint8(resize_image(pixels, size, mode)) for pixels in decoded.pixels]
