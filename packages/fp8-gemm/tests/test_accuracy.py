"""Quantization accuracy at the format's floor, and the outlier-channel requirement."""

from __future__ import annotations

import math

import pytest
import torch
from fp8_gemm import outlier_activations, quantization_sqnr, sqnr_db, sqnr_report


def test_sqnr_db_basics():
    x = torch.randn(64, 64)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.01) == pytest.approx(40.0, abs=1e-3)
    y = x.clone()
    y[0, 0] = float("nan")
    assert math.isnan(sqnr_db(x, y))


@pytest.mark.parametrize(("fmt", "floor_db"), [("e4m3", 29.0), ("e5m2", 23.0)])
def test_gaussian_sqnr_at_the_format_floor(device, fmt, floor_db):
    # 3 (2) mantissa bits: uniform rounding noise on Gaussian data gives about 31 (25) dB at any granularity.
    x = torch.randn(64, 512, device=device)
    for gran, block in [("tensor", None), ("row", None), ("channel", None), ("block", (1, 128)),
                        ("block", (128, 128))]:
        db = quantization_sqnr(x, gran, fmt, block)
        assert floor_db < db < floor_db + 6, f"{fmt} {gran}: {db:.2f} dB"


def test_outlier_channels_cost_row_and_block_scaling_at_most_2x(device):
    rows = {r["granularity"]: r for r in sqnr_report(64, 512, n_outliers=4, factor=100.0, device=device)}
    assert set(rows) == {"tensor", "row", "channel", "block 1x128", "block 128x128"}
    for name in ("row", "block 1x128", "block 128x128"):
        assert rows[name]["noise_ratio"] <= 2.0, rows[name]
        assert rows[name]["inlier_noise_ratio"] <= 2.0, rows[name]


def test_outlier_data_is_what_it_says(device):
    x = outlier_activations(32, 256, n_outliers=3, factor=100.0, device=device)
    col_max = x.abs().amax(dim=0)
    assert (col_max > 50).sum() == 3 and (col_max < 10).sum() == 253
