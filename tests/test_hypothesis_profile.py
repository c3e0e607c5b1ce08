"""The suite's hypothesis settings: the same examples every run (see tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="an explicit profile was chosen")
def test_hypothesis_is_derandomised() -> None:
    from tests import test_dtf_properties

    assert settings().derandomize and settings().database is None
    assert test_dtf_properties.SETTINGS.derandomize, "module-level settings inherit the profile"
