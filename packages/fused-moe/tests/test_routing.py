"""Routing and grouping against their PyTorch twins: expert ids and the grouping exactly, weights closely; ties,
NaN, every top_k, empty experts, all pairs to one expert."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import f64, make_moe
from fused_moe import align_reference, max_tiles, moe_align, moe_route, route_reference
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import device_for_tests

DEVICE = device_for_tests()


@pytest.mark.parametrize("t,top_k", [(1, 1), (1, 4), (3, 2), (17, 3), (64, 4), (64, 1)])
def test_route_matches_reference_fp32(device, t, top_k):
    x, rw, rb, *_ = make_moe(t, 48, 8, 8, seed=t * 10 + top_k, router_scale=4.0, device=DEVICE)
    ids, wts = moe_route(x, rw, rb, top_k)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32 and ids.shape == (t, top_k)
    rids, rwts = route_reference(*f64(x, rw, rb), top_k)
    assert torch.equal(ids.cpu().long(), rids)
    torch.testing.assert_close(wts.cpu().double(), rwts, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wts.sum(-1), torch.ones(t, device=device))


@pytest.mark.parametrize("split", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_with_the_router_gemm_split_along_k(device, monkeypatch, split, dtype):
    # the decode path: the router GEMM over `split` programs of whole K steps (hidden 150: 3 steps of 64 under the
    # interpreter, so at 5 splits two get no step), their partial logits added by the route kernel in a fixed order
    from fused_moe import ops

    # (the package's conftest poisons the workspace and outputs: an entry never written fails)
    monkeypatch.setattr(ops, "_route_split", lambda t, h, on_cpu, chosen: split)
    ops.clear_caches()
    try:
        x, rw, rb, *_ = make_moe(7, 150, 8, 12, dtype=dtype, seed=split, router_scale=4.0, device=DEVICE)
        ids, wts = moe_route(x, rw, rb, 3)
        rids, rwts = route_reference(*f64(x, rw, rb), 3, round_to=dtype if dtype != torch.float32 else None)
        assert torch.equal(ids.cpu().long(), rids)
        torch.testing.assert_close(wts.cpu().double(), rwts, atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)
        assert torch.equal(moe_route(x, rw, rb, 3)[1], wts)  # deterministic
    finally:
        ops.clear_caches()


@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("experts,programs", [(12, 4), (40, 4), (8, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_with_the_logits_split_by_expert(device, monkeypatch, t, experts, programs, dtype):
    # the few-token decode path (_router_rows_kernel): the experts over about `programs` programs (12 experts in
    # blocks of 4: 3 programs; 40 in blocks of 16, the last partial; 8 in blocks of 1), each summing its experts'
    # logits over all of K (hidden 150: K steps masked at the edge); one launch routes (eager), or the route kernel
    # reads the logits (the registered op): the same bits, and the reference's choice
    from fused_moe import ops
    from triton_ops_core import scratch

    monkeypatch.setattr(ops, "_route_rows", lambda t, on_cpu: True)
    monkeypatch.setattr(ops, "ROUTE_ROWS_PROGRAMS", programs)
    monkeypatch.setattr(ops, "ROUTE_ROWS_TILE", 1024)  # several K steps
    ops.clear_caches()
    try:
        x, rw, rb, *_ = make_moe(t, 150, 8, experts, dtype=dtype, seed=t + experts, router_scale=4.0, device=DEVICE)
        ids, wts = moe_route(x, rw, rb, 3)
        rids, rwts = route_reference(*f64(x, rw, rb), 3, round_to=dtype if dtype != torch.float32 else None)
        assert torch.equal(ids.cpu().long(), rids)
        torch.testing.assert_close(wts.cpu().double(), rwts, atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)
        kept = [buf for key, buf in scratch._BUFFERS.items() if key[0] == ops._ROUTE_COUNTERS]
        assert kept and not any(buf.any() for buf in kept)
        ids_op, wts_op = torch.ops.triton_ops.moe_route(x, rw, rb, 3, True)
        assert torch.equal(ids_op, ids) and torch.equal(wts_op, wts)
        ids_all, _ = moe_route(x, rw, rb, 3, renormalize=False)  # the softmax over every expert: two launches
        assert torch.equal(ids_all, ids)
    finally:
        ops.clear_caches()


def test_rows_router_tiles():
    # about ROUTE_ROWS_PROGRAMS programs of whole experts; the product tile within ROUTE_ROWS_TILE elements
    from fused_moe import ops

    x = torch.empty(1, 2048, dtype=torch.bfloat16)
    for experts, t, programs, block_k in ((128, 1, 32, 2048), (32, 1, 32, 2048), (128, 8, 32, 256), (8, 1, 8, 2048)):
        w = torch.empty(experts, 2048, dtype=torch.bfloat16)
        logits, whole = ops._rows_route_plans(x.expand(t, -1), w, 1, 0.0, (False, 16), False,
                                              (False, 4, 4, True, True, False), True)
        assert logits.grid[0] == programs and whole.grid[0] == programs
        block_t, block_ep, bk = logits.tail[7:10]
        assert (block_t, bk) == (t, block_k) and block_t * block_ep * bk <= ops.ROUTE_ROWS_TILE


class _Launches:
    """Stands for the route kernel: counts the launches, and fails the test on one where none may happen."""

    def __init__(self, kernel, allowed: bool) -> None:
        self.kernel, self.allowed, self.count = kernel, allowed, 0

    def __getitem__(self, grid):
        if not self.allowed:
            pytest.fail("the route kernel was launched")
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("t,split", [(7, 1), (7, 5), (70, 3)])
def test_one_launch_routing_gives_the_two_launch_bits(device, monkeypatch, t, split):
    """With the router GEMM split, a plain eager call routes in one launch: the split kernel's last program of each
    token block (70 tokens: two blocks under the interpreter) adds the partial logits and selects the experts, with
    the two-launch routing's ids and weights bit for bit and the kept arrival counters back at zero. Calls through
    the registered op (torch.compile, its CUDA graphs) take the two launches, as do routers without renormalization."""
    from fused_moe import _kernels as K
    from fused_moe import ops
    from triton_ops_core import scratch

    monkeypatch.setattr(ops, "_route_split", lambda t, h, on_cpu, chosen: split)
    x, rw, rb, *_ = make_moe(t, 150, 8, 12, dtype=torch.bfloat16, seed=t + split, router_scale=4.0, device=DEVICE)
    real = K._route_kernel

    def route(allowed, op=False, renormalize=True):
        ops.clear_caches()
        spy = _Launches(real, allowed)
        monkeypatch.setattr(K, "_route_kernel", spy)
        try:
            if op:
                return torch.ops.triton_ops.moe_route(x, rw, rb, 3, renormalize), spy.count
            return moe_route(x, rw, rb, 3, renormalize=renormalize), spy.count
        finally:
            monkeypatch.setattr(K, "_route_kernel", real)
            ops.clear_caches()

    (ids, wts), _ = route(allowed=False)
    kept = [buf for key, buf in scratch._BUFFERS.items() if key[0] == ops._ROUTE_COUNTERS]
    assert kept and not any(buf.any() for buf in kept)
    (ids_op, wts_op), launches = route(allowed=True, op=True)
    assert launches == 1
    monkeypatch.setattr(ops, "ROUTE_IN_ONE_LAUNCH", False)
    (ids2, wts2), launches = route(allowed=True)
    assert launches == 1
    assert torch.equal(ids, ids2) and torch.equal(wts, wts2)
    assert torch.equal(ids_op, ids2) and torch.equal(wts_op, wts2)
    rids, _ = route_reference(*f64(x, rw, rb), 3, round_to=torch.bfloat16)
    assert torch.equal(ids.cpu().long(), rids)
    monkeypatch.setattr(ops, "ROUTE_IN_ONE_LAUNCH", True)
    (ids_all, _), launches = route(allowed=True, renormalize=False)  # the softmax over every expert
    assert launches == 1 and torch.equal(ids_all, ids)


def test_route_split_count(monkeypatch):
    from fused_moe import ops

    monkeypatch.setattr(ops, "ROUTE_SPLIT_STEPS", 1)
    assert ops._route_split(1, 2880, False, None) == 23  # gpt-oss: 23 steps of 128, one per program
    assert ops._route_split(64, 2048, False, None) == 16  # Qwen3-MoE
    monkeypatch.setattr(ops, "ROUTE_SPLIT_STEPS", 2)
    assert ops._route_split(1, 2880, False, None) == 12  # two per program
    assert ops._route_split(65, 2880, False, None) == 0  # prefill: the route kernel's programs suffice
    assert ops._route_split(1, 2880, True, None) == 0  # the interpreter: one program is cheapest
    assert ops._route_split(1, 2880, True, 3) == 3  # asked for
    assert ops._route_split(1, 200, False, None) == 0  # one program: the route kernel computes the GEMM itself
    monkeypatch.setattr(ops, "ROUTE_SPLIT_STEPS", 0)
    assert ops._route_split(1, 2880, False, None) == 0  # off


@pytest.mark.parametrize("element_size,experts", [(4, 64), (4, 128), (2, 32)])
def test_route_tiles_fit_a_gpu_with_less_shared_memory(element_size, experts):
    from fused_moe import ops
    from triton_ops_core.device import DeviceInfo, simulate_device

    small = DeviceInfo("Simulated 99 KB GPU", (8, 9), 58, 48 * 2**20, 99 * 1024, 300.0, True, "simulated")
    block_e = max(16, 1 << (experts - 1).bit_length())
    block_k = max(16, ops.ROUTE_TILE_K[0] * 64 // max(block_e, 64))
    with simulate_device(small):
        k, stages = ops._route_tiles_that_fit(16, block_e, block_k, ops.ROUTE_TILE_K[1], element_size,
                                              torch.device("cuda"))
    assert stages >= 1 and k >= 16
    assert stages * (16 + block_e) * k * element_size <= 99 * 1024
    assert (k, stages) != (block_k, ops.ROUTE_TILE_K[1]) or experts == 32  # only the fp32 routers had to shrink


@pytest.mark.parametrize("experts,top_k", [(4, 4), (32, 4), (128, 8), (20, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_expert_counts_and_full_softmax(device, experts, top_k, renormalize):
    x, rw, rb, *_ = make_moe(9, 40, 8, experts, seed=experts, router_scale=4.0, device=DEVICE)
    ids, wts = moe_route(x, rw, None, top_k, renormalize=renormalize)
    rids, rwts = route_reference(*f64(x, rw), None, top_k, renormalize=renormalize)
    assert torch.equal(ids.cpu().long(), rids)
    torch.testing.assert_close(wts.cpu().double(), rwts, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_16bit_rounds_logits_like_the_model(device, dtype):
    x, rw, rb, *_ = make_moe(33, 64, 8, 16, dtype=dtype, seed=3, router_scale=4.0, device=DEVICE)
    ids, wts = moe_route(x, rw, rb, 4)
    # the model's router: F.linear in the input dtype (fp32 accumulation, one rounding)
    rids, rwts = route_reference(*(t.float().cpu() for t in (x, rw, rb)), 4, round_to=dtype)
    assert torch.equal(ids.cpu().long(), rids)
    torch.testing.assert_close(wts.cpu(), rwts, atol=1e-6, rtol=1e-5)


def test_route_ties_go_to_the_lowest_expert(device):
    x = torch.zeros(5, 16, device=device)
    rw = torch.randn(8, 16, device=device)
    rb = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.0, 0.5], device=device)  # logits are the bias
    ids, wts = moe_route(x, rw, rb, 3)
    assert ids.tolist() == [[1, 2, 4]] * 5
    torch.testing.assert_close(wts, torch.full((5, 3), 1 / 3, device=device))
    ids, wts = moe_route(x, rw, torch.zeros(8, device=device), 4)  # every logit equal
    assert ids.tolist() == [[0, 1, 2, 3]] * 5


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_route_nan_token_gets_valid_distinct_experts(device):
    x, rw, rb, *_ = make_moe(4, 16, 8, 8, seed=5, device=DEVICE)
    x[2, 3] = float("nan")
    ids, wts = moe_route(x, rw, rb, 4)
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(r)) == 4 for r in ids.tolist())
    assert torch.isnan(wts[2]).all() and torch.isfinite(wts[[0, 1, 3]]).all()


def test_route_leading_dims_and_empty(device):
    x, rw, rb, *_ = make_moe(0, 16, 8, 8, seed=6, lead=(2, 3), device=DEVICE)
    ids, wts = moe_route(x, rw, rb, 2)
    assert ids.shape == (2, 3, 2) and wts.shape == (2, 3, 2)
    ids, wts = moe_route(x[:, :0], rw, rb, 2)
    assert ids.shape == (2, 0, 2)


@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "two_experts", "last_expert"])
def test_align_matches_reference(device, block_m, pattern):
    gen = torch.Generator().manual_seed(block_m)
    t, k, e = 37, 4, 12
    if pattern == "random":
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    elif pattern == "one_expert":
        ids = torch.full((t, k), 5)
    elif pattern == "two_experts":
        ids = torch.tensor([[3, 9, 3, 9]] * t)
    else:
        ids = torch.full((t, k), e - 1)
    ids = ids.int().to(device)
    want = align_reference(ids, e, block_m)
    for chunk in (None, 32):  # one program; and the chunked prefill path (count, scan, scatter)
        got = moe_align(ids, e, block_m, chunk=chunk)
        for name, a, b in zip(want._fields, got, want):
            assert torch.equal(a.cpu(), b), (name, chunk)


@given(t=st.integers(1, 70), k=st.integers(1, 4), e=st.integers(4, 40), block_m=st.sampled_from([16, 32, 64]),
       int64=st.booleans(), seed=st.integers(0, 2**16), chunk=st.sampled_from([None, 16, 32]))
def test_align_property(t, k, e, block_m, int64, seed, chunk):
    gen = torch.Generator().manual_seed(seed)
    hot = torch.randint(1, e + 1, (1,), generator=gen).item()  # often few experts get every pair
    ids = torch.stack([torch.randperm(hot, generator=gen)[:k] for _ in range(t)]) if hot >= k else \
        torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    ids = ids.to(torch.int64 if int64 else torch.int32).to(DEVICE)
    # chunk: the prefill path (count per chunk of pairs, scan, scatter) on small sizes
    got, want = moe_align(ids, e, block_m, chunk=chunk), align_reference(ids, e, block_m)
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a.cpu(), b), name
    assert got.tile_expert.numel() == max_tiles(t * k, e, block_m)


def test_max_tiles_bound_is_tight_enough():
    assert max_tiles(0, 32, 16) == 0
    assert max_tiles(4, 32, 16) == 4  # one token, top-4: four experts, one tile each
    assert max_tiles(256, 32, 64) == 36
