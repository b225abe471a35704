"""The CPU half of preprocessing: decoded pixels -> the uint8 images every model input starts from."""

from __future__ import annotations

import numpy as np
import pydicom.data
import pytest

from medhier.config import DicomConfig
from medhier.io.dicom import DicomRejected, decode
from medhier.io.image import decode_images, resize_image, to_uint8


def test_pad_keeps_aspect_ratio_and_centres_on_black():
    wide = np.ones((50, 100), np.float32)
    out = resize_image(wide, 64, "pad")
    assert out.shape == (64, 64)
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0)  # 64x32 band in the middle
    np.testing.assert_allclose(out[17:47], 1, atol=1e-6)


@pytest.mark.parametrize("mode", ["pad", "stretch", "crop"])
@pytest.mark.parametrize("shape", [(512, 512), (300, 500), (37, 91), (8, 8)])
def test_resize_modes_give_square_images(mode, shape):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = resize_image(image, 48, mode)
    assert out.shape == (48, 48) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


def test_downscaling_is_antialiased():
    # A 1-pixel checkerboard averages to grey when shrunk; without antialiasing it aliases.
    board = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    out = resize_image(board, 64, "stretch")
    assert abs(out.mean() - 0.5) < 0.02 and out.std() < 0.05


def test_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(to_uint8(np.array([-1, 0, 0.5, 1 / 255 * 0.49, 1, 2], np.float32)), [0, 0, 128, 0, 255, 255])


@pytest.mark.parametrize("name, frames", [("CT_small.dcm", [0]), ("SC_rgb_rle_2frame.dcm", [1])])
def test_decode_images_is_decode_then_resize_then_uint8(name, frames):
    data = open(pydicom.data.get_testdata_file(name), "rb").read()
    decoded, images = decode_images(data, DicomConfig(), 40, "crop", source=name)
    assert list(decoded.frames) == frames
    expected = to_uint8(resize_image(decode(data, DicomConfig()).pixels[0], 40, "crop"))
    assert len(images) == 1 and images[0].dtype == np.uint8
    np.testing.assert_array_equal(images[0], expected)


def test_decode_images_rejects_what_decode_rejects():
    with pytest.raises(DicomRejected, match="not_dicom: notes.txt"):
        decode_images(b"plain text, not DICOM", DicomConfig(), 32, source="notes.txt")
