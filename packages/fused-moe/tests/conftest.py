import sys
from pathlib import Path

import pytest
import torch

# _moe_helpers sits beside the tests (a unique name: tests of sibling packages may run in one session).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    """Every intermediate and output buffer of the ops starts as NaN (floats) or -7 (ints: an invalid id or row),
    in every test of the package: a row, tile or partial sum a kernel skips fails the comparison."""
    from fused_moe import ops
    from triton_ops_core.testing import poison_

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return poison_(t) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(ops, "_empty", empty)
    ops.clear_caches()  # a plan cached by an earlier test would keep that test's tiles
    yield
    ops.clear_caches()
