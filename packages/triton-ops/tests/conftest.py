"""Shared paths for the umbrella's tests (the shared pytest plugin sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# the helpers beside the tests (_tp_cases, test_patch_model's): importable by name in pytest's importlib import mode
# too (CI's newest-triton session runs every package's tests in one pytest)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture
def recorded_json() -> Path:
    return HERE / "fixtures" / "recorded_results.json"


@pytest.fixture
def fused_norms(monkeypatch) -> None:
    """The decode step's RMSNorms inside the GEMMs' launches (``decoder_layers.INPUT_NORM_IN_QKV`` for every row
    count the kernels take, shipped for one row only, and ``POST_NORM_IN_MLP``, shipped off: both measured on the
    H200), for the tests of those fusions."""
    from triton_ops.models import decoder_layers

    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", True)
    # every row count the kernels take (the shipped default fuses one row only), so the tests see their reach
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_MAX_ROWS", 16)
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The model integration's tests run every parametrized case in every CI session (``every_param``): their cases
    are model families and recipes, each a different transformers code path, and the two sessions run different
    transformers releases. The kernel packages' cases (dtypes, shapes, layouts) are split between the two triton
    versions (``--param-shard``, docs/development.md)."""
    for item in items:
        if Path(item.path).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.every_param)
