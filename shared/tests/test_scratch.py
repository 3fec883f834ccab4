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


class _Graph:
    """Stands for the torch CUDAGraph being captured (its Python object keeps attributes)."""


def _capture(monkeypatch, graph):
    monkeypatch.setattr(scratch, "KEEP_IN_CAPTURES", True)
    monkeypatch.setattr(scratch, "_capturing", lambda device: True)
    monkeypatch.setattr(scratch, "_capturing_graph", lambda: graph)


def test_a_capture_by_hand_keeps_its_buffers_on_the_graph(monkeypatch):
    # Launches captured into one graph share a buffer per (name, stream): one memset node in the graph, not one per
    # split-K launch. Another graph gets its own (they may replay in any order); eager buffers are not touched.
    dev = torch.device("cpu")
    eager = scratch.scratch("test.capture", dev, 16, torch.int32, zeroed=True, stream=7)
    eager[:] = 3
    first, second = _Graph(), _Graph()
    _capture(monkeypatch, first)
    assert scratch.kept(dev)
    a = scratch.scratch("test.capture", dev, 16, torch.int32, zeroed=True, stream=7)
    assert a.data_ptr() != eager.data_ptr() and not a.any()
    a[:] = 0  # zero at rest, as the kernels leave it
    assert scratch.scratch("test.capture", dev, 12, torch.int32, zeroed=True, stream=7).data_ptr() == a.data_ptr()
    assert scratch.scratch("test.capture", dev, 12, torch.int32, zeroed=True, stream=8).data_ptr() != a.data_ptr()
    grown = scratch.scratch("test.capture", dev, 5000, torch.int32, zeroed=True, stream=7)
    assert grown.numel() >= 5000 and not grown.any()
    # launches captured before the growth still point at the old buffer: the graph keeps it alive
    assert any(t is a for t in first._triton_ops_scratch[scratch._RETIRED])
    _capture(monkeypatch, second)
    b = scratch.scratch("test.capture", dev, 16, torch.int32, zeroed=True, stream=7)
    assert b.data_ptr() not in (a.data_ptr(), grown.data_ptr(), eager.data_ptr())
    monkeypatch.setattr(scratch, "_capturing", lambda device: False)
    assert scratch.scratch("test.capture", dev, 16, torch.int32, zeroed=True, stream=7).data_ptr() == eager.data_ptr()


def test_a_capture_through_the_registered_op_or_an_unnamed_graph_gets_fresh_buffers(monkeypatch):
    dev = torch.device("cpu")
    graph = _Graph()
    _capture(monkeypatch, graph)
    with scratch.per_call():  # torch.compile's CUDA graphs: nothing made in the call may outlive it
        assert not scratch.kept(dev)
        one = scratch.scratch("test.capture_fresh", dev, 16, torch.int32, zeroed=True, stream=1)
        two = scratch.scratch("test.capture_fresh", dev, 16, torch.int32, zeroed=True, stream=1)
    assert one.data_ptr() != two.data_ptr() and not hasattr(graph, "_triton_ops_scratch")

    class _NewWrapperEachTime:  # a torch that names the graph by a new Python object on every call
        def __call__(self):
            return _Graph()

    monkeypatch.setattr(scratch, "_capturing_graph", _NewWrapperEachTime())
    assert not scratch.kept(dev)
    one = scratch.scratch("test.capture_fresh", dev, 16, torch.int32, zeroed=True, stream=1)
    two = scratch.scratch("test.capture_fresh", dev, 16, torch.int32, zeroed=True, stream=1)
    assert one.data_ptr() != two.data_ptr() and not one.any()
    monkeypatch.setattr(scratch, "_capturing_graph", lambda: None)  # a torch without get_currently_capturing_graph
    assert not scratch.kept(dev)
    monkeypatch.setattr(scratch, "_capturing_graph", lambda: graph)
    monkeypatch.setattr(scratch, "KEEP_IN_CAPTURES", False)  # switched off: every capture as the registered op's
    assert not scratch.kept(dev) and not hasattr(graph, "_triton_ops_scratch")


def test_the_capturing_graph_is_named_by_torch_where_it_can(monkeypatch):
    # torch's CUDAGraph names the graph being captured (the binding the graph-kept buffers rest on); off a capture
    # it raises, which reads as "no graph".
    get = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if get is None or not torch.cuda.is_available():
        assert scratch._capturing_graph() is None
        return
    assert scratch._capturing_graph() is None
    monkeypatch.setattr(scratch, "KEEP_IN_CAPTURES", True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        named = scratch._capturing_graph()
        buffers = scratch._graph_buffers()
    assert named is graph and buffers is graph._triton_ops_scratch


def test_keep_on_names_the_graph_on_any_torch(monkeypatch):
    # scratch.keep_on(graph): the graph given keeps the buffers, whatever torch can name and whatever the switch says;
    # outside the block (or inside per_call, the registered ops' way) nothing is kept on it.
    dev = torch.device("cpu")
    monkeypatch.setattr(scratch, "KEEP_IN_CAPTURES", False)
    monkeypatch.setattr(scratch, "_capturing", lambda device: True)
    monkeypatch.setattr(scratch, "_capturing_graph", lambda: None)  # this torch names no graph
    graph, other = _Graph(), _Graph()
    assert not scratch.kept(dev)
    with scratch.keep_on(graph):
        assert scratch.kept(dev)
        a = scratch.scratch("test.keep_on", dev, 16, torch.int32, zeroed=True, stream=3)
        assert not a.any()
        assert scratch.scratch("test.keep_on", dev, 8, torch.int32, zeroed=True, stream=3).data_ptr() == a.data_ptr()
        with scratch.keep_on(other):  # nested: the inner graph's own, then back to the outer one
            assert scratch.scratch("test.keep_on", dev, 16, torch.int32, zeroed=True, stream=3).data_ptr() \
                != a.data_ptr()
        assert scratch.scratch("test.keep_on", dev, 16, torch.int32, zeroed=True, stream=3).data_ptr() == a.data_ptr()
        with scratch.per_call():
            assert not scratch.kept(dev)
            assert scratch.scratch("test.keep_on", dev, 16, torch.int32, zeroed=True, stream=3).data_ptr() \
                != a.data_ptr()
    assert any(t is a for t in graph._triton_ops_scratch.values() if isinstance(t, torch.Tensor))
    assert len(other._triton_ops_scratch) == 1
    assert not scratch.kept(dev)  # after the block: fresh buffers again under a capture
    one = scratch.scratch("test.keep_on", dev, 16, torch.int32, zeroed=True, stream=3)
    assert one.data_ptr() != a.data_ptr()
