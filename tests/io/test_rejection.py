"""The typed rejection every stage raises: one base, each stage's own reason table, one format."""

from __future__ import annotations

import pytest

from medhier.io import dicom, seg, volume
from medhier.io.rejection import Rejection
from medhier.plaque import register

# (exception class, its module's reason table, a reason from it, what else it must still be)
CASES = [
    (dicom.DicomRejected, dicom.REASONS, "corrupt_pixels", Exception),
    (volume.SeriesRejected, volume.REASONS, "missing_positions", Exception),
    (seg.SegRejected, seg.REASONS, "not_a_seg", Exception),
    (register.RegistrationError, register.REASONS, "no_overlap", ValueError),  # caught as a ValueError
]
IDS = [case[0].__name__ for case in CASES]


@pytest.mark.parametrize("cls,table,reason,also", CASES, ids=IDS)
def test_a_rejection_carries_its_reason_and_message(cls, table, reason, also):
    exc = cls(reason, "IM0006.dcm: half the pixel data is missing")
    assert isinstance(exc, Rejection) and isinstance(exc, also)
    assert cls.reasons is table
    assert (exc.reason, exc.message) == (reason, "IM0006.dcm: half the pixel data is missing")
    assert str(exc) == f"{reason}: IM0006.dcm: half the pixel data is missing"


@pytest.mark.parametrize("cls", [case[0] for case in CASES], ids=IDS)
def test_a_code_outside_the_table_is_refused(cls):
    with pytest.raises(AssertionError, match="no_such_reason"):
        cls("no_such_reason", "anything")


def test_stage_specific_fields_stay():
    series = volume.SeriesRejected("missing_positions", "slice 5 missing", series_uid="1.2.3", sources=["a.dcm", "b.dcm"])
    assert (series.series_uid, series.sources) == ("1.2.3", ("a.dcm", "b.dcm"))
    assert seg.SegRejected("not_a_seg", "an SR", source="sr.dcm").source == "sr.dcm"


@pytest.mark.parametrize("cls,table,reason,also", CASES, ids=IDS)
def test_a_rejection_survives_pickling_as_ray_moves_it_out_of_a_task(cls, table, reason, also):
    import pickle

    kwargs = {volume.SeriesRejected: {"series_uid": "1.2.3", "sources": ["a.dcm"]}, seg.SegRejected: {"source": "s.dcm"}}.get(cls, {})
    exc = cls(reason, "IM0006.dcm: half the pixel data is missing", **kwargs)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and (back.reason, back.message, str(back)) == (exc.reason, exc.message, str(exc))
    assert {k: getattr(back, k) for k in kwargs} == {k: getattr(exc, k) for k in kwargs}
