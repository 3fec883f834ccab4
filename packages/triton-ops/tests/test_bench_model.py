"""The model-level benchmark's harness (benchmarks/bench_model.py) on tiny models under the interpreter: variants are
built and patched, the accuracy comparison sees what it should, and the report renders. Timing runs only on a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2] if (HERE.parents[2] / "benchmarks" / "bench_model.py").is_file() else None
# newest_only: CI runs the harness beside the newest transformers only (the GPU machine's is recent too)
pytestmark = [pytest.mark.skipif(REPO is None, reason="needs the monorepo checkout (benchmarks/)"),
              pytest.mark.newest_only]


@pytest.fixture(scope="module")
def bm():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import bench_model
    finally:
        sys.path.remove(str(REPO))
    return bench_model


@pytest.mark.parametrize("name", ["llama3-8b", "qwen3-8b", "gpt-oss-20b", "qwen3-30b-a3b", "mixtral-8x7b",
                                  "gemma3-12b", "gemma2-9b", "phi4"])
def test_patched_variant_agrees_with_the_unpatched_model(bm, name, device):
    config = bm.build_config(name, tiny=True)
    if name == "gpt-oss-20b":
        config.layer_types = ["sliding_attention", "full_attention"]
    device = torch.device(device)
    reference = bm.make_variant("transformers", config, device, torch.float32)
    patched = bm.make_variant("patched", config, device, torch.float32)
    assert patched.triton_ops_patch.fused_residual_adds == config.num_hidden_layers
    prompt = torch.randint(0, config.vocab_size, (2, 6), device=device)
    new = 2 if device.type == "cpu" else 3  # two new tokens (a cached decode step) keep CI's interpreter run short
    ref = bm.reference_outputs(reference, prompt, new)
    acc = bm.compare_outputs(ref, bm.reference_outputs(patched, prompt, new, ref["sequence"]))
    assert acc["finite"]
    if device.type == "cpu":  # the interpreter computes fp32 exactly like the model
        assert acc["forced_top1_agreement"] == 1.0 and acc["forced_cosine_min"] > 0.99999
    else:  # compiled kernels' fp32 dots may use TF32 (cuBLAS does not): near-tied tokens can flip
        assert acc["forced_cosine_min"] > 0.999
    # the weights a decode step reads: every parameter but the input embedding
    embed = reference.get_input_embeddings().weight
    expected = sum(p.numel() * p.element_size() for p in reference.parameters() if p is not embed)
    assert bm.decode_weight_bytes(reference) == expected
    experts = sum(p.numel() * p.element_size() for n, p in reference.named_parameters() if ".mlp.experts." in n)
    assert bm.decode_weight_bytes(reference, experts_only=True) == experts
    assert (experts > 0) == (bm.moe_shape(config) is not None) == (name in ("gpt-oss-20b", "qwen3-30b-a3b",
                                                                            "mixtral-8x7b"))
    if name != "gpt-oss-20b":
        assert patched.triton_ops_patch.moe_blocks == (config.num_hidden_layers if experts else 0)
    # transformers' experts interface, only the experts ours: the harness's variant once (CI time; the interface
    # itself is test_experts_backend's, for every experts layout)
    if name == "gpt-oss-20b" and _takes_named_experts():
        swapped = bm.make_variant("experts-triton_ops", config, device, torch.float32)
        assert swapped.config._experts_implementation == "triton_ops"
        got = bm.compare_outputs(ref, bm.reference_outputs(swapped, prompt, new, ref["sequence"]))
        assert got["forced_cosine_min"] > (0.99999 if device.type == "cpu" else 0.999)


def _takes_named_experts() -> bool:
    """transformers 5.7 and later accept a registered experts implementation (5.0-5.6 only their own three)."""
    from transformers.integrations import moe

    return "is_concatenated" in moe.use_experts_implementation.__code__.co_varnames


def test_the_floor_of_a_mixture_of_experts_counts_the_experts_a_step_is_expected_to_hit(bm):
    dense, experts = 1000, 3200  # bytes: everything else, and all 32 experts
    assert bm.floor_bytes(dense + experts, experts, (32, 4), 1) == pytest.approx(dense + experts * 4 / 32)
    # two tokens: an expert is missed by both with probability (28/32)^2
    assert bm.floor_bytes(dense + experts, experts, (32, 4), 2) == pytest.approx(dense + experts * (1 - (28 / 32) ** 2))
    assert bm.floor_bytes(dense + experts, experts, (32, 4), 512) == pytest.approx(dense + experts)
    assert bm.floor_bytes(dense, 0, None, 8) == dense  # a dense model: every weight
    assert bm.moe_shape(bm.build_config("gpt-oss-20b", tiny=False)) == (32, 4)
    assert bm.moe_shape(bm.build_config("qwen3-30b-a3b", tiny=False)) == (128, 8)
    assert bm.moe_shape(bm.build_config("qwen1.5-moe-a2.7b", tiny=False)) == (60, 4)
    assert bm.moe_shape(bm.build_config("llama3-8b", tiny=False)) is None


def test_fused_norms_variant_switches_the_fusions_on_for_its_measurement_only(bm, monkeypatch):
    from triton_ops.models import decoder_layers
    from triton_ops_core.testing import device_for_tests

    shipped = bm.library_switches()
    # the input norm inside the q/k/v launch (at one row), the post-attention norm's own launch (measured faster),
    # the MoE's add fused
    assert shipped == (True, False, True, False)
    for name in bm.NORM_SWITCHES:  # restored after the test, whatever make_variant leaves
        monkeypatch.setattr(decoder_layers, name, getattr(decoder_layers, name))
    config = bm.build_config("llama3-8b", tiny=True)
    device = device_for_tests()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bm.make_variant("patched-fp8" + bm.FUSED_NORMS, config, device, dtype)
    assert decoder_layers.INPUT_NORM_IN_QKV and decoder_layers.POST_NORM_IN_MLP
    assert decoder_layers.RESIDUAL_IN_MOE_COMBINE
    bm.make_variant("patched", config, device, dtype)
    assert tuple(getattr(decoder_layers, name) for name in bm.NORM_SWITCHES) == shipped
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", False)
    bm.make_variant("patched" + bm.INPUT_NORM, config, device, dtype)  # the input norm's fusion alone
    assert decoder_layers.INPUT_NORM_IN_QKV and not decoder_layers.POST_NORM_IN_MLP
    bm.make_variant("patched", config, device, dtype)
    assert tuple(getattr(decoder_layers, name) for name in bm.NORM_SWITCHES) == shipped
    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert {"patched-fp8-checkpoint-input-norm", "patched-pdl-input-norm"} <= set(known)
    assert "patched-fused-norms-input-norm" not in known and "patched-input-norm-pdl" not in known
    bm.make_variant("patched-fp8" + bm.INPUT_NORM + bm.O_PROJ_NORM, config, device, dtype)
    assert decoder_layers.INPUT_NORM_IN_QKV and decoder_layers.POST_NORM_IN_O_PROJ
    assert not decoder_layers.POST_NORM_IN_MLP
    assert "patched-fp8-checkpoint-input-norm-o-proj-norm" in known and "patched-o-proj-norm" in known
    assert "patched-o-proj-norm-input-norm" not in known
    assert bm.split_variant("patched-fp8-checkpoint-input-norm") == ("patched-fp8-checkpoint",
                                                                     frozenset({bm.INPUT_NORM}))
    assert "patched-fp8-default-fused-norms" in bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert "transformers-fused-norms" not in bm.known_variants(bm.VARIANTS)


def test_pdl_variants_set_programmatic_dependent_launch_for_their_measurement(bm):
    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    for name in ("patched-pdl", "patched-no-pdl", "patched-fp8-default-pdl-fused-norms"):
        assert name in known
    assert "transformers-pdl" not in known and "patched-fused-norms-pdl" not in known
    assert bm.pdl_setting("patched-fp8-default-pdl") is True
    assert bm.pdl_setting("patched-no-pdl-fused-norms") is False
    assert bm.pdl_setting("patched") is None and bm.pdl_setting("transformers") is None


def test_keep_and_release_variants_switch_them_on_for_their_measurement_only(bm):
    from triton_ops_core import launch, pdl

    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert {"patched-fp8-checkpoint-pdl-keep-release", "patched-keep", "patched-release-input-norm"} <= set(known)
    assert "patched-release-keep" not in known and "transformers-keep" not in known
    assert bm.split_variant("patched-fp8-checkpoint-pdl-keep-release") == (
        "patched-fp8-checkpoint", frozenset({bm.PDL_ON, bm.KEEP_SCRATCH, bm.RELEASE_EARLY}))
    shipped = bm.KEEP_ON_GRAPH, pdl.RELEASE_SHORT
    seen = []
    for variant in ("patched-pdl-keep-release", "patched-keep", "patched-release", "patched", "patched-no-release"):
        generation = launch._generation
        with bm.launch_switches(variant):
            seen.append((bm.KEEP_ON_GRAPH, pdl.RELEASE_SHORT))
            assert launch._generation > generation  # plans made before are not reused under the switches
        assert (bm.KEEP_ON_GRAPH, pdl.RELEASE_SHORT) == shipped
    assert seen == [(True, True), (True, shipped[1]), (shipped[0], True), shipped, (shipped[0], False)]
    assert bm.split_variant("patched-fp8-checkpoint-pdl-no-release") == (
        "patched-fp8-checkpoint", frozenset({bm.PDL_ON, bm.NO_RELEASE}))


def test_shift_variants_switch_the_rings_off_for_their_measurement(bm, monkeypatch):
    from triton_ops.models import cache_updates

    monkeypatch.setattr(cache_updates, "SLIDING_RING", cache_updates.SLIDING_RING)  # restored after the test
    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert {"patched-shift", "patched-fp8-default-shift-no-pdl", "patched-shift-pdl-fused-norms"} <= set(known)
    assert "patched-pdl-shift" not in known and "transformers-shift" not in known
    assert bm.split_variant("patched-fp8-shift-no-pdl-fused-norms") == (
        "patched-fp8", frozenset({bm.SHIFT, bm.PDL_OFF, bm.FUSED_NORMS}))
    assert bm.pdl_setting("patched-shift-pdl") is True
    from triton_ops_core.testing import device_for_tests

    config = bm.build_config("llama3-8b", tiny=True)
    device = device_for_tests()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bm.make_variant("patched-shift", config, device, dtype)
    assert cache_updates.SLIDING_RING is False
    bm.make_variant("patched", config, device, dtype)
    assert cache_updates.SLIDING_RING is cache_updates.SHIPPED_SLIDING_RING is True


def test_a_changed_model_is_seen_by_the_comparison(bm):
    ref = {"logits": torch.randn(2, 10), "tokens": torch.tensor([[1, 2, 3], [4, 5, 6]]),
           "forced": torch.randn(2, 3, 10)}
    other = {"logits": -ref["logits"], "tokens": torch.tensor([[1, 9, 3], [4, 5, 6]]), "forced": -ref["forced"]}
    acc = bm.compare_outputs(ref, other)
    assert acc["logits_cosine_min"] < -0.99 and acc["forced_top1_agreement"] == 0.0
    assert acc["greedy_agreement"] == pytest.approx(5 / 6) and acc["greedy_steps_before_first_difference"] == 1


def test_report_renders_every_part_and_names_failures(bm):
    point = {"batch": 1, "context": 8, "gpu_us": 20.0, "kernels": 5, "tokens_per_s": 5e4, "eager_wall_ms": 1.0,
             "top_kernels": [{"kernel": "k|1", "us": 12.0, "launches": 2}]}
    variant = {"variant": "transformers", "decode": [point], "generate": {"eager": {"ms_per_token": 1.0,
               "tokens_per_s": 1000.0}}, "prefill": {"tokens": 16, "ms": 2.0, "compiled_ms": 1.5}, "accuracy": {},
               "weight_bytes": 100, "peak_memory_gib": 1.0, "errors": ["generate static-compiled: RuntimeError: boom"]}
    report = {"environment": {"device": "X", "command": "c", "torch": "t", "triton": "tr", "transformers": "tf",
                              "cuda": "c", "date_utc": "d"}, "copy_gbps": 4000.0,
              "models": [{"model": "m", "layers": 2, "hidden": 4, "floor_us": {"transformers": 10.0},
                          "variants": [variant]}]}
    md = bm.render(report)
    assert "| transformers | 1 | 8 | 20 us | 5 | 50,000 | 1.00x | 10 us | 2.00x | - | - |" in md  # no graph time
    point["graph_us"] = 30.0
    assert "| 10 us | 2.00x | 30 us | 3.00x |" in bm.render(report)  # the CUDA-graph step against the floor
    assert "2.00 ms / 1.50 ms compiled (16 tokens)" in md and "generate static-compiled: RuntimeError: boom" in md
    assert "`k/1`" in md and "`k|1`" not in md  # a kernel name never breaks the table
    # one breakdown column per decode point; a kernel outside a point's top list shows "-" there
    variant["decode"].append({**point, "batch": 8, "top_kernels": [{"kernel": "k|1", "us": 30.0, "launches": 4},
                                                                    {"kernel": "other", "us": 50.0, "launches": 1}]})
    md = bm.render(report)
    assert "| kernel | 1 x 8 | 8 x 8 |" in md
    assert "| `other` | - | 50 (1) |" in md and "| `k/1` | 12 (2) | 30 (4) |" in md
    assert md.index("`other`") < md.index("`k/1` | 12")  # the larger total first
    assert "prefill's GPU time" not in md  # no profiled prefill, no breakdown
    variant["prefill"].update(gpu_ms=1.6, kernels=40, top_kernels=[{"kernel": "gemm|x", "us": 800.0, "launches": 8}])
    md = bm.render(report)
    assert "16-token prefill's GPU time goes, transformers (eager: 1.60 ms of kernels in 40 launches" in md
    assert "| `gemm/x` | 800 | 8 | 50.0% |" in md
    variant["prefill"]["profile_error"] = "RuntimeError: no CUPTI"
    assert "prefill could not be profiled: RuntimeError: no CUPTI" in bm.render(report)


def test_decode_layer_marginal_layer_is_held_against_its_own_floor():
    # the two-layer model's weights minus the one-layer model's: a recipe may convert a lone layer differently
    # (the default keeps down_proj in bf16 only inside a decoder stack), so the added layer has its own floor
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import bench_decode_layer as dl
    finally:
        sys.path.remove(str(REPO))
    one = {"floor_us": 56.5, "rows": [{"M": 1, "gpu_us": 100.0, "kernels": 20}]}
    two = {"floor_us": 127.1, "rows": [{"M": 1, "gpu_us": 203.4, "kernels": 29}]}
    dl.add_marginal(one, two)
    row = one["rows"][0]
    assert row["layer_us"] == pytest.approx(103.4) and row["layer_kernels"] == 9
    assert row["layer_floor_us"] == pytest.approx(70.6)
    assert dl._marginal_x_floor(row, one["floor_us"]) == "1.46x"
    # a saved run without the field (before session 20) keeps its old reading
    assert dl._marginal_x_floor({"layer_us": 103.4}, 56.5) == "1.83x"


def test_report_holds_a_mixture_of_experts_against_the_experts_it_hits(bm):
    points = [{"batch": b, "context": 8, "gpu_us": 20.0, "kernels": 5, "tokens_per_s": 5e4, "eager_wall_ms": 1.0}
              for b in (1, 64)]
    variant = {"variant": "patched", "decode": points, "generate": {}, "prefill": {}, "accuracy": {},
               "weight_bytes": 5_000_000, "expert_bytes": 3_200_000, "peak_memory_gib": 1.0, "errors": []}
    report = {"environment": {"device": "X", "command": "c", "torch": "t", "triton": "tr", "transformers": "tf",
                              "cuda": "c", "date_utc": "d"}, "copy_gbps": 1000.0,
              "models": [{"model": "m", "layers": 2, "hidden": 4, "floor_us": {"patched": 5.0}, "variants": [variant],
                          "bandwidth_gbps": 1000.0, "moe": [32, 4]}]}
    md = bm.render(report)
    assert "## m (2 layers, hidden 4; 32 experts, top 4)" in md
    # batch 1: 1.8 MB + 4/32 of 3.2 MB = 2.2 MB at 1 TB/s; batch 64: nearly every expert, 5.0 MB
    assert "| patched | 1 | 8 | 20 us | 5 | 50,000 | 1.00x | 2 us | 9.09x |" in md
    assert "| patched | 64 | 8 | 20 us | 5 | 50,000 | 1.00x | 5 us | 4.00x |" in md


def test_experts_suffixes_convert_the_experts_of_fp8_variants(bm):
    from fused_moe import is_fp8_experts, uses_fp8_activations
    from triton_ops_core.testing import device_for_tests

    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert {"patched-fp8-default-experts-w8a8", "patched-fp8-experts-fp8-shift-pdl"} <= set(known)
    assert "patched-fp8-shift-experts-w8a8" not in known
    assert bm.split_variant("patched-fp8-default-experts-w8a8-no-pdl") == (
        "patched-fp8-default", frozenset({bm.EXPERTS_W8A8, bm.PDL_OFF}))
    config = bm.build_config("gpt-oss-20b", tiny=True)
    device = device_for_tests()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for suffix, fp8, w8a8 in (("", False, False), (bm.EXPERTS_FP8, True, False), (bm.EXPERTS_W8A8, True, True)):
        model = bm.make_variant("patched-fp8" + suffix, config, device, dtype)
        experts = [m.experts for m in model.modules() if hasattr(m, "router") and hasattr(m, "experts")]
        assert experts and all(is_fp8_experts(e) == fp8 and uses_fp8_activations(e) == w8a8 for e in experts)
    with pytest.raises(ValueError, match="patched FP8 variant"):
        bm.make_variant("patched" + bm.EXPERTS_W8A8, config, device, dtype)


def test_the_fp8_checkpoint_variant_holds_fp8_experts_that_patch_model_adopts(bm, device):
    # Qwen3-MoE as an FP8 checkpoint loads: its experts transformers' FP8Experts (128x128 blocks), which patch_model
    # hands to fused_moe as they are; the model stays close to the bf16 one (FP8 rounding only)
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(finegrained, "FP8Experts"):
        pytest.skip("this transformers has no FP8Experts")
    config = bm.build_config("qwen3-30b-a3b", tiny=True)
    device = torch.device(device)
    reference = bm.make_variant("transformers", config, device, torch.float32)
    patched = bm.make_variant("patched-fp8-checkpoint", config, device, torch.float32)
    experts = [m for m in patched.modules() if type(m) is finegrained.FP8Experts]
    assert len(experts) == config.num_hidden_layers
    assert all(e.gate_up_scale.dim() == 3 and e.gate_up_proj.dtype == torch.float8_e4m3fn for e in experts)
    assert patched.triton_ops_patch.moe_blocks == config.num_hidden_layers
    prompt = torch.randint(0, config.vocab_size, (1, 5), device=device)
    ref = bm.reference_outputs(reference, prompt, 1)
    acc = bm.compare_outputs(ref, bm.reference_outputs(patched, prompt, 1, ref["sequence"]))
    assert acc["finite"] and acc["forced_cosine_min"] > 0.99


def test_unfused_tail_variants_switch_the_gated_down_fusion_off_for_their_measurement(bm, monkeypatch):
    from triton_ops import layers
    from triton_ops_core.testing import device_for_tests

    monkeypatch.setattr(layers, "FUSED_W8A8_TAIL", layers.FUSED_W8A8_TAIL)  # restored after the test
    monkeypatch.setattr(layers, "NORM_QUANTIZES_W8A8", layers.NORM_QUANTIZES_W8A8)
    known = bm.known_variants(bm.VARIANTS + bm.EXTRA_VARIANTS)
    assert {"patched-fp8-checkpoint-unfused-tail", "patched-fp8-unfused-tail-pdl",
            "patched-fp8-checkpoint-unfused-norm-fp8"} <= set(known)
    assert "patched-fp8-unfused-norm-fp8-unfused-tail" not in known  # one of the group
    assert "patched-pdl-unfused-tail" not in known and "transformers-unfused-tail" not in known
    assert bm.split_variant("patched-fp8-checkpoint-unfused-tail-pdl") == (
        "patched-fp8-checkpoint", frozenset({bm.UNFUSED_TAIL, bm.PDL_ON}))
    config = bm.build_config("llama3-8b", tiny=True)
    device = device_for_tests()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bm.make_variant("patched-unfused-tail", config, device, dtype)
    assert layers.FUSED_W8A8_TAIL is False and layers.NORM_QUANTIZES_W8A8 is False
    bm.make_variant("patched-unfused-norm-fp8", config, device, dtype)
    assert layers.FUSED_W8A8_TAIL is True and layers.NORM_QUANTIZES_W8A8 is False
    bm.make_variant("patched", config, device, dtype)
    assert layers.FUSED_W8A8_TAIL is True and layers.NORM_QUANTIZES_W8A8 is True
