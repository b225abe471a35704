"""What both phantom generators write alike: derived UIDs, DS values, Part 10 files with the
phantoms' file meta, and an archive's files written in parallel."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from medhier.config import StorageConfig
from medhier.synthetic import writing as W


def test_uids_are_derived_from_names():
    first = W.derived_uid("medhier-phantom|seed=1", "P0001", "sop", 3)
    assert first == W.derived_uid("medhier-phantom|seed=1", "P0001", "sop", "3")  # parts count as text
    assert UID(first).is_valid and len(first) <= 64
    other_seed = W.derived_uid("medhier-phantom|seed=2", "P0001", "sop", 3)
    other_instance = W.derived_uid("medhier-phantom|seed=1", "P0001", "sop", 4)
    assert len({first, other_seed, other_instance}) == 3


# (value, DS written)
DS_CASES = [
    (0.5, "0.5"),
    (400, "400"),
    (-1024.0, "-1024"),
    (1 / 3, "0.3333333333"),
    (-1234567.891234, "-1234567.891"),
    (1e-20, "1e-20"),
]


@pytest.mark.parametrize("value,text", DS_CASES)
def test_decimal_strings_fit_sixteen_characters(value, text):
    assert W.decimal_string(value) == text
    assert len(text) <= 16 and float(text) == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed!r}"):
        W.check_seed(seed)


def test_a_whole_float_seed_is_that_integer():
    assert type(W.check_seed(3.0)) is int and W.check_seed(3.0) == 3


def test_part10_files_carry_the_phantom_file_meta():
    ds = W.image_elements()
    ds.file_meta = W.file_meta(CTImageStorage, "1.2.826.0.1.3680043.8.498.1")
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.8.498.1"
    data = W.part10_bytes(ds)
    assert data[128:132] == b"DICM"
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.ImplementationVersionName == "MEDHIER_SYNTH"
    assert (back.Manufacturer, back.BitsAllocated, back.SamplesPerPixel) == (W.MANUFACTURER, 16, 1)


def test_files_are_written_in_order_with_their_sizes(tmp_path):
    cfg = StorageConfig(read_threads=2)  # 2 threads: the 30 files pass the 8-file memory bound
    files = [(f"P{i // 10:04d}/IM{i:04d}.dcm", bytes([i]) * (i + 1)) for i in range(30)]
    assert W.write_files(str(tmp_path), iter(files), cfg, "test-write") == [i + 1 for i in range(30)]
    for rel, data in files:
        assert (tmp_path / rel).read_bytes() == data


def test_a_failed_write_is_raised(tmp_path):
    (tmp_path / "P0001").write_bytes(b"a file where a folder must go")
    with pytest.raises(OSError):
        W.write_files(str(tmp_path), [("P0001/IM0001.dcm", b"x")], StorageConfig(), "test-write")
