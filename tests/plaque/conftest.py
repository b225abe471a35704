"""The carotid phantom archive the plaque job's tests share (read-only: copy it to change it)."""

from __future__ import annotations

import pytest

from tests.plaque.phantoms import make_phantom


@pytest.fixture(scope="session")
def carotid_archive(tmp_path_factory):
    return make_phantom(str(tmp_path_factory.mktemp("carotid-visits")))
