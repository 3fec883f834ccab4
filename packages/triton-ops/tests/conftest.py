"""Shared paths for the umbrella's tests (the shared pytest plugin sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def recorded_json() -> Path:
    return HERE / "fixtures" / "recorded_results.json"
