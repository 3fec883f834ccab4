"""The kept scratch buffers (``triton_ops_core.scratch``): per stream, zeroed when grown, per call inside ops."""

from __future__ import annotations

import torch
from triton_ops_core import scratch


def test_scratch_buffers_are_per_stream():
    # Two streams get different counters and partials (they may run at once); one stream reuses its own; a
    # larger request replaces the buffer with a zeroed one.
    dev = torch.device("cpu")
    a = scratch.scratch("test.counters", dev, 10, torch.int32, zeroed=True, stream=1)
    b = scratch.scratch("test.counters", dev, 10, torch.int32, zeroed=True, stream=2)
    assert a.data_ptr() != b.data_ptr()
    assert scratch.scratch("test.counters", dev, 8, torch.int32, zeroed=True, stream=1).data_ptr() == a.data_ptr()
    a[:10] = 7
    grown = scratch.scratch("test.counters", dev, 5000, torch.int32, zeroed=True, stream=1)
    assert grown.numel() >= 5000 and not grown.any()
    assert scratch._stream_id(torch.device("cpu")) == 0


def test_calls_through_the_registered_op_keep_no_scratch_buffer():
    # torch.compile's CUDA graphs refuse a buffer made during a call that outlives it: inside per_call() (the
    # registered ops' implementations) every request gets a buffer of its own, zeroed when asked, never kept.
    dev = torch.device("cpu")
    kept = scratch.scratch("test.per_call", dev, 16, torch.int32, zeroed=True, stream=3)
    kept[:] = 5
    with scratch.per_call():
        with scratch.per_call():  # nested ops (FP8Linear -> its GEMM) stay per call
            inner = scratch.scratch("test.per_call", dev, 16, torch.int32, zeroed=True, stream=3)
        outer = scratch.scratch("test.per_call", dev, 16, torch.int32, zeroed=True, stream=3)
    assert len({kept.data_ptr(), inner.data_ptr(), outer.data_ptr()}) == 3
    assert not inner.any() and not outer.any() and inner.numel() == 16
    assert scratch.scratch("test.per_call", dev, 16, torch.int32, zeroed=True, stream=3).data_ptr() == kept.data_ptr()


def test_kept_buffers_only_on_plain_calls():
    # per_call() (the registered ops' implementations) hands out fresh buffers: kept() says so, for callers that
    # would rather launch differently than pay a memset (CUDA-graph captures say False too, on a GPU)
    dev = torch.device("cpu")
    assert scratch.kept(dev)
    with scratch.per_call():
        assert not scratch.kept(dev)
    assert scratch.kept(dev)
