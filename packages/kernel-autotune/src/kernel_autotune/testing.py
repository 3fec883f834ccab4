"""A check that kernel packages' tests run on their own tunable family (free of pytest)."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch

from .registry import ENTRY_POINT_GROUP, Tunable, available_tunables, get_tunable


def check_family(name: str, distribution: str, small_shape: Mapping[str, Any], device: torch.device) -> Tunable:
    """Assert that family ``name`` (module ``<name>.tuning``) is found by name with its benchmark shapes, that the
    installed ``distribution`` declares its entry point (run from source: that the module registered it), and that
    its prepared call runs on ``small_shape``; returns the family."""
    tuning = importlib.import_module(f"{name}.tuning")
    tunable = get_tunable(name)
    assert isinstance(tunable, Tunable) and tunable.name == name, tunable
    assert tunable.shapes == tuning.SHAPES and tunable.shipped.name == "tuned_configs.json"
    assert all(tunable.label(shape) for shape in tunable.shapes)
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:  # from source: no entry points, the module registered it
        assert available_tunables()[name] == "registered"
    else:
        points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        assert any(p.name == name and p.value == f"{name}.tuning:tunable" for p in points), name
    out = tunable.prepare(small_shape, device)()
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out.float()).all()
    return tunable


__all__ = ["check_family"]
