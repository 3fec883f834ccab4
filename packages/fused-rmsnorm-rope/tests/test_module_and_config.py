"""FusedRMSNormRoPE, the exported names, the config space and the config lookup."""

from __future__ import annotations

import fused_rmsnorm_rope as pkg
import torch
from _rope_helpers import check_rmsnorm_rope, rope_tables
from fused_rmsnorm_rope import RMSNORM_ROPE_CONFIGS, FusedRMSNormRoPE, heuristic_config
from fused_rmsnorm_rope.config import clear_config_cache, get_config


def test_public_api():
    for name in ("fused_rmsnorm_rope", "fused_qk_norm_rope", "FusedRMSNormRoPE", "RMSNORM_ROPE_CONFIGS",
                 "reference", "rmsnorm_rope_reference", "qk_norm_rope_reference", "__version__"):
        assert hasattr(pkg, name), name
    assert pkg.reference.rmsnorm_rope_reference is pkg.rmsnorm_rope_reference


def test_module_forward_matches_reference(device):
    m = FusedRMSNormRoPE(96, 32, eps=1e-5, rotary_dim=16, layout="interleaved").to(device)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(2, 3, 96, device=device, dtype=torch.float16)
    cos, sin = rope_tables(10, 16, device=device, interleaved=True)
    pos = torch.tensor([[0, 4, 9], [1, 2, 3]], device=device)
    out = m(x, cos, sin, position_ids=pos)
    check_rmsnorm_rope(out, x, m.weight, cos, sin, eps=1e-5, position_ids=pos, rotary_dim=16, head_dim=32,
                       layout="interleaved")
    assert "head_dim=32" in repr(m) and "rotary_dim=16" in repr(m)


def test_gemma_module_starts_at_identity_scale(device):
    m = FusedRMSNormRoPE(64, 16, gemma=True).to(device)
    assert torch.equal(m.weight.detach().cpu(), torch.zeros(64))
    plain = FusedRMSNormRoPE(64, 16).to(device)
    x = torch.randn(1, 2, 64, device=device)
    cos, sin = rope_tables(2, 16, device=device)
    torch.testing.assert_close(m(x, cos, sin), plain(x, cos, sin))


def test_config_space_and_heuristic():
    configs = RMSNORM_ROPE_CONFIGS.configs({"tokens": 8192, "row_elems": 4096})
    assert {"num_warps": 4, "ROWS_PER_PROG": 1} in configs
    assert all(c["num_warps"] * 64 <= 4096 for c in configs)
    assert len(RMSNORM_ROPE_CONFIGS.configs(None)) == RMSNORM_ROPE_CONFIGS.size()
    for elems in (64, 512, 1024, 2048, 4096, 8192, 16384):
        for tokens in (1, 64, 4096, 1 << 20):
            for qk in (False, True):
                cfg = heuristic_config(elems, tokens, qk)
                assert RMSNORM_ROPE_CONFIGS.allows(cfg, {"tokens": tokens, "row_elems": elems}), (elems, tokens, cfg)
    assert heuristic_config(8192, 1 << 16) == {"num_warps": 4, "ROWS_PER_PROG": 1}


def test_get_config_is_memoized(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path))
    clear_config_cache()
    a = get_config("fused_rmsnorm_rope.fwd", 4096, 100, torch.float16, torch.device("cpu"))
    b = get_config("fused_rmsnorm_rope.fwd", 4096, 120, torch.float16, torch.device("cpu"))  # same bucket
    assert a is b and a == heuristic_config(4096, 100)


def test_select_config_gets_a_working_bench_and_its_answer_is_used(device, monkeypatch):
    import fused_rmsnorm_rope.config as config
    from fused_rmsnorm_rope import clear_caches, fused_rmsnorm_rope

    seen = []

    def fake_select_config(name, *, problem, default, space, bench, **kw):
        assert space is RMSNORM_ROPE_CONFIGS and bench is not None
        cfg = {"num_warps": 2, "ROWS_PER_PROG": 2}
        bench(cfg)()  # the tuner would time this: it must launch the kernel with cfg
        seen.append((name, dict(problem)))
        return cfg

    monkeypatch.setattr(config, "select_config", fake_select_config)
    clear_caches()
    try:
        x = torch.randn(3, 5, 64, device=device)
        w = torch.randn(64, device=device)
        cos, sin = rope_tables(5, 16, device=device, random=True)
        check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin), x, w, cos, sin)  # odd rows: 2 rows per program
        assert seen == [("fused_rmsnorm_rope.fwd", {"tokens": 15, "row_elems": 64})]
        q, k = torch.randn(1, 5, 4, 16, device=device), torch.randn(1, 5, 2, 16, device=device)
        pkg.fused_qk_norm_rope(q, k, w[:16], w[:16], cos, sin)
        assert seen[-1][0] == "fused_rmsnorm_rope.qk_fwd"
    finally:
        clear_caches()
