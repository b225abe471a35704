"""medhier.plaque.patients: the patients table typed by predict.covariates; raw IDs hashed on read
and gone; every mismatch fails naming the column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medhier.config import CovariateSpec, StorageConfig, load_config
from medhier.io.dicom import patient_key
from medhier.plaque.patients import PatientsError, read_patients

COVARIATES = {
    "sex": CovariateSpec("categorical", "", ["F", "M"]),
    "age_years": CovariateSpec("numeric", "years"),
    "statin": CovariateSpec("boolean"),
}


def read(tmp_path, text: str, covariates=COVARIATES, salt: str = "s3cret"):
    path = tmp_path / "patients.csv"
    path.write_text(text)
    return read_patients(str(path), covariates, StorageConfig(), salt)


def test_typed_values_and_missing_ones(tmp_path):
    table = read(tmp_path, "patient_key,sex,age_years,statin\nk1,F,61,1\nk2,M,,no\nk3,,70.5,TRUE\nk4,M,55,\n")
    assert table.schema.types == [pa.string(), pa.string(), pa.float64(), pa.bool_()]
    assert table.to_pylist() == [
        {"patient_key": "k1", "sex": "F", "age_years": 61.0, "statin": True},
        {"patient_key": "k2", "sex": "M", "age_years": None, "statin": False},
        {"patient_key": "k3", "sex": None, "age_years": 70.5, "statin": True},
        {"patient_key": "k4", "sex": "M", "age_years": 55.0, "statin": None},
    ]


def test_patient_ids_are_hashed_with_the_dicom_salt_and_never_kept(tmp_path):
    table = read(tmp_path, "patient_id,issuer_of_patient_id,sex,age_years,statin\nCAROTID-0007,HOSP,F,61,0\nP2,,M,50,1\n")
    assert table["patient_key"].to_pylist() == [patient_key("CAROTID-0007", "HOSP", "s3cret"), patient_key("P2", "", "s3cret")]
    assert table.column_names == ["patient_key", "sex", "age_years", "statin"]
    assert "CAROTID-0007" not in str(table.to_pylist())


def test_parquet_with_native_types(tmp_path):
    path = tmp_path / "patients.parquet"
    pq.write_table(pa.table({"patient_key": ["a", "b"], "sex": ["M", None], "age_years": [60, 71], "statin": [True, None]}), path)
    table = read_patients(str(path), COVARIATES, StorageConfig())
    assert table.to_pylist()[1] == {"patient_key": "b", "sex": None, "age_years": 71.0, "statin": None}


BAD = [  # (csv text, message)
    ("patient_key,sex,age_years,statin,bmi\nk,F,60,1,22\n", "column 'bmi' is not a covariate of predict.covariates"),
    ("patient_key,sex,statin\nk,F,1\n", "no column 'age_years', a covariate of predict.covariates"),
    ("patient_key,sex,age_years,statin\nk,F,sixty,1\n", r"column 'age_years' \(numeric, years\), row 1: 'sixty' is not a number"),
    ("patient_key,sex,age_years,statin\nk,F,60,1\nj,X,60,1\n", r"column 'sex' \(categorical\), row 2: 'X' is not one of its categories \['F', 'M'\]"),
    ("patient_key,sex,age_years,statin\nk,F,60,maybe\n", r"column 'statin' \(boolean\), row 1: 'maybe' is not true/false"),
    ("sex,age_years,statin\nF,60,1\n", "need exactly one key column, patient_key or patient_id"),
    ("patient_key,patient_id,sex,age_years,statin\nk,P,F,60,1\n", "need exactly one key column"),
    ("patient_key,sex,age_years,statin\nk,F,60,1\nk,M,61,0\n", "rows 1 and 2 are the same patient"),
    ("patient_key,sex,age_years,statin\n,F,60,1\n", "row 1 has no patient_key"),
    ("patient_key,sex,age_years,statin\nk,F,60,1,extra\n", "row 1 has more fields than the header"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[b[1][:40] for b in BAD])
def test_a_file_that_does_not_match_fails_naming_the_column(tmp_path, text, message):
    with pytest.raises(PatientsError, match=message):
        read(tmp_path, text)


def test_duplicate_raw_ids_are_reported_without_the_id(tmp_path):
    with pytest.raises(PatientsError) as err:
        read(tmp_path, "patient_id,sex,age_years,statin\nSECRET-ID,F,60,1\nSECRET-ID,F,60,1\n")
    assert "SECRET-ID" not in str(err.value) and "rows 1 and 2" in str(err.value)


def test_the_default_covariates_read_the_phantom_patients_csv():
    from tests.plaque.cohort import PATIENTS, PATIENTS_CSV

    table = read_patients(PATIENTS_CSV, load_config().predict.covariates, StorageConfig())
    assert table.num_rows == PATIENTS
    assert set(table["smoking"].to_pylist()) == {"never", "former", "current"}
    assert table["statin"].null_count == 0 and 45 <= min(table["age_years"].to_pylist())


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="patients '.*none.csv' not found"):
        read_patients(str(tmp_path / "none.csv"), COVARIATES, StorageConfig())
