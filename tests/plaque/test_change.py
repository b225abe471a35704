"""medhier.plaque.change: consecutive visits -> rates per year, with the rules for zero first
values, same-day visits, error rows and re-measured studies; read from a measure output or a
Parquet file."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medhier.config import FactorSpec, StorageConfig
from medhier.plaque.change import change_factors, factor_unit, read_measurements

D0 = dt.date(2020, 1, 1)
FACTORS = {
    "wall": FactorSpec("max_wall_thickness_mm"),
    "lipid_abs": FactorSpec("lipid_core_volume_mm3"),
    "lipid_rel": FactorSpec("lipid_core_volume_mm3", "relative"),
    "stenosis": FactorSpec("stenosis_area_pct"),
}


def visit(patient: str, uid: str, days: int | None, wall: float | None = 1.0, lipid: float | None = 10.0, stenosis: float = 20.0,
          status: str = "ok", scored_at: int = 0) -> dict:
    return {"patient_key": patient, "study_instance_uid": uid, "visit_date": None if days is None else D0 + dt.timedelta(days=days),
            "status": status, "max_wall_thickness_mm": wall, "lipid_core_volume_mm3": lipid, "stenosis_area_pct": stenosis,
            "scored_at": scored_at}


def table(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows))


YEAR = 365.25  # days: the rates are per year of 365.25 days

CASES = [  # (visits, expected pairs: (patient, from uid, to uid, {factor: rate or None}))
    pytest.param([visit("a", "1", 0, 1.0, 10.0, 20.0), visit("a", "2", 730, 1.4, 14.0, 26.0)],
                 [("a", "1", "2", {"wall": 0.4 * YEAR / 730, "lipid_abs": 4.0 * YEAR / 730, "lipid_rel": 40.0 * YEAR / 730,
                                   "stenosis": 6.0 * YEAR / 730})], id="two-years"),
    pytest.param([visit("a", "2", 400, 1.2), visit("a", "1", 0, 1.0), visit("a", "3", 800, 1.6)],
                 [("a", "1", "2", {"wall": 0.2 * YEAR / 400}), ("a", "2", "3", {"wall": 0.4 * YEAR / 400})], id="ordered-by-date"),
    pytest.param([visit("a", "1", 0, lipid=0.0), visit("a", "2", 365, lipid=5.0)],
                 [("a", "1", "2", {"lipid_abs": 5.0 * YEAR / 365, "lipid_rel": None})], id="relative-from-zero-is-null"),
    pytest.param([visit("a", "1", 0, wall=None), visit("a", "2", 365, wall=1.0)],
                 [("a", "1", "2", {"wall": None, "lipid_abs": 0.0})], id="null-measurement-nulls-one-factor"),
    pytest.param([visit("a", "1", 0), visit("a", "2", 0), visit("a", "3", 365, 2.0)],
                 [("a", "2", "3", {"wall": 1.0 * YEAR / 365})], id="same-day-makes-no-pair"),
    pytest.param([visit("a", "1", 0), visit("a", "2", 200, status="error", wall=None), visit("a", "3", 365, 2.0)],
                 [("a", "1", "3", {"wall": 1.0 * YEAR / 365})], id="error-row-skipped"),
    pytest.param([visit("a", "1", 0), visit("a", "2", None), visit("a", "3", 365, 2.0)],
                 [("a", "1", "3", {"wall": 1.0 * YEAR / 365})], id="undated-skipped"),
    pytest.param([visit("a", "1", 0), visit("a", "2", 365, 5.0, scored_at=1), visit("a", "2", 365, 2.0, scored_at=2)],
                 [("a", "1", "2", {"wall": 1.0 * YEAR / 365})], id="remeasured-study-latest-row"),
    pytest.param([visit("a", "1", 0), visit("b", "2", 365)], [], id="one-visit-each-no-pair"),
]


@pytest.mark.parametrize("rows, expected", CASES)
def test_pairs_and_rates(rows, expected):
    pairs, summary = change_factors(table(*rows), FACTORS)
    got = pairs.to_pylist()
    assert [(r["patient_key"], r["from_study_instance_uid"], r["to_study_instance_uid"]) for r in got] == [e[:3] for e in expected]
    for row, (*_, rates) in zip(got, expected):
        for factor, rate in rates.items():
            if rate is None:
                assert row[factor] is None, factor
            else:
                assert row[factor] == pytest.approx(rate, rel=1e-12, abs=1e-12), factor
    assert summary.pairs == len(expected)


def test_summary_counts_what_was_left_out():
    rows = [visit("a", "1", 0, lipid=0.0), visit("a", "2", 0), visit("a", "3", 365), visit("a", "4", 500, status="error"),
            visit("b", "5", None), visit("b", "6", 10), visit("c", "7", 3, scored_at=1), visit("c", "7", 3, scored_at=2)]
    _, summary = change_factors(table(*rows), FACTORS)
    assert summary.visits == 8 and summary.visits_used == 5  # 1, 2, 3, 6, 7
    assert summary.excluded == {"status_error": 1, "undated": 1, "remeasured": 1}
    assert (summary.patients, summary.patients_one_visit, summary.same_day_pairs, summary.pairs) == (3, 2, 1, 1)
    assert summary.undefined == {}  # the zero-lipid visit is in the same-day pair, which makes no rate


@pytest.mark.parametrize("spec, unit", [
    (FactorSpec("max_wall_thickness_mm"), "mm/y"), (FactorSpec("stenosis_area_pct"), "pp/y"),
    (FactorSpec("lipid_core_volume_mm3"), "mm3/y"), (FactorSpec("lipid_core_volume_mm3", "relative"), "%/y"),
])
def test_factor_units(spec, unit):
    assert factor_unit(spec) == unit


@pytest.mark.parametrize("dates", [["2020-01-01", "2021-01-01"], ["20200101", "20210101"]], ids=["iso", "dicom-da"])
def test_dates_as_text(dates):
    rows = [visit("a", "1", 0), visit("a", "2", 0, wall=2.0)]
    for row, text in zip(rows, dates):
        row["visit_date"] = text
    pairs, _ = change_factors(table(*rows), FACTORS)
    assert pairs["years"].to_pylist() == [pytest.approx(366 / YEAR)]  # 2020 is a leap year


def test_missing_columns_are_named():
    rows = [{k: v for k, v in visit("a", "1", 0).items() if k != "stenosis_area_pct"}]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['stenosis_area_pct'\]"):
        change_factors(table(*rows), FACTORS)


def test_read_measurements_from_a_measure_output_and_from_parquet(tmp_path):
    rows = table(visit("a", "1", 0), visit("a", "2", 365))
    report = tmp_path / "out" / "report" / "run_id=r1"
    report.mkdir(parents=True)
    with_source = rows.append_column("model_id", pa.array(["seg:archive"] * 2)).append_column("model_version", pa.array(["m1"] * 2))
    pq.write_table(with_source, report / "part-0.parquet")
    assert read_measurements(str(tmp_path / "out"), StorageConfig()).num_rows == 2
    pq.write_table(rows, tmp_path / "visits.parquet")
    assert read_measurements(str(tmp_path / "visits.parquet"), StorageConfig()).num_rows == 2

    other = tmp_path / "out" / "report" / "run_id=r2"
    other.mkdir()
    index = with_source.schema.get_field_index("model_version")
    pq.write_table(with_source.set_column(index, "model_version", pa.array(["m2"] * 2)), other / "part-0.parquet")
    with pytest.raises(ValueError, match="2 segmentation sources or measurement versions"):
        read_measurements(str(tmp_path / "out"), StorageConfig())
    with pytest.raises(FileNotFoundError, match="measurements '.*nowhere' not found"):
        read_measurements(str(tmp_path / "nowhere"), StorageConfig())


def test_relative_rate_of_a_shrinking_volume_is_negative():
    pairs, _ = change_factors(table(visit("a", "1", 0, lipid=20.0), visit("a", "2", 365, lipid=15.0)), FACTORS)
    assert pairs["lipid_rel"].to_pylist() == [pytest.approx(-25.0 * YEAR / 365)]
