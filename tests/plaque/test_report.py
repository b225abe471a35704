"""The measure job's report: every column documented, dates read as DICOM writes them, NaN
stored as null, counts of visits, series and SEG objects by outcome and reason."""

from __future__ import annotations

import datetime as dt
import json
import math

import pyarrow as pa
import pytest

from medhier import columns as C
from medhier.plaque import report
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.report import REASONS, REPORT_SCHEMA, VisitRejected, VisitTally, measurement_values, to_json, visit_date


def test_every_report_column_is_documented():
    documented = report.__doc__
    missing = [name for name in REPORT_SCHEMA.names if name not in MEASUREMENTS and name not in documented]
    assert not missing
    assert all(pa.types.is_integer(REPORT_SCHEMA.field(n).type) == (unit in ("count", "index")) for n, (unit, _) in MEASUREMENTS.items())


@pytest.mark.parametrize(
    "text, expected",
    [("20240305", dt.date(2024, 3, 5)), ("2024.03.05", dt.date(2024, 3, 5)), ("", None), ("2024", None), ("20241305", None)],
)
def test_a_study_date_becomes_a_visit_date(text, expected):
    assert visit_date(text) == expected


def test_missing_measurements_are_null_and_json_has_no_nan():
    values = {name: (math.nan if name == "min_cap_thickness_mm" else 1) for name in MEASUREMENTS}
    assert measurement_values(values)["min_cap_thickness_mm"] is None
    assert set(measurement_values(None).values()) == {None}
    assert json.loads(to_json({"a": math.nan, "b": [1.5]})) == {"a": None, "b": [1.5]}
    with pytest.raises(AssertionError):
        VisitRejected("not_a_reason", "unknown codes are a bug")
    assert {"no_reference_series", "missing_positions", "seg_other_series", "no_segmentation"} <= set(REASONS)


def test_the_tally_counts_visits_series_and_segs_by_outcome():
    series = [{"outcome": "used", "rejected_instances": {}}, {"outcome": "rejected", "reason": "gap", "rejected_instances": {"x": "unreadable_instance"}}]
    table = pa.table({
        C.STATUS: ["ok", "error"], C.ERROR_REASON: [None, "no_segmentation"],
        "series": [json.dumps(series), json.dumps([{"outcome": "unmatched"}])],
        "segmentation_objects": [json.dumps([{"outcome": "used"}, {"outcome": "superseded"}]), "[]"],
    })
    tally = VisitTally()
    tally(table)
    assert (tally.visits, tally.ok, tally.errors) == (2, 1, {"no_segmentation": 1})
    assert tally.series == {"used": 1, "rejected": 1, "unmatched": 1} and tally.series_rejected == {"gap": 1}
    assert tally.instances_rejected == {"unreadable_instance": 1}
    assert tally.segmentation_objects == {"used": 1, "superseded": 1}
