"""The carotid phantom archive the plaque job's tests share (read-only: copy it to change it)."""

from __future__ import annotations

import pytest

from tests.plaque.phantoms import make_phantom


@pytest.fixture(scope="session")
def carotid_archive(tmp_path_factory):
    return make_phantom(str(tmp_path_factory.mktemp("carotid-visits")))


@pytest.fixture(scope="session")
def cohort_fit(ray_session, tmp_path_factory):
    """The prediction model fitted once on the frozen phantom cohort (tests.plaque.cohort):
    -> (FitSummary, output folder). Shared by the fit, predict and tune tests (read-only)."""
    from medhier.plaque.fit import fit_model
    from tests.plaque.cohort import PATIENTS_CSV, VISITS
    from tests.plaque.phantoms import cfg

    output = str(tmp_path_factory.mktemp("cohort-fit"))
    return fit_model(cfg(), VISITS, PATIENTS_CSV, output), output


@pytest.fixture(scope="session")
def seg_run(ray_session, tmp_path_factory):
    """The session's trained plaque segmentation model (tests/plaque/seg_trained.py)."""
    from tests.plaque.seg_trained import train_session_model  # torch, MONAI: only for the tests that use it

    return train_session_model(str(tmp_path_factory.mktemp("plaque-seg")))
