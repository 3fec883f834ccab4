"""FP8Linear and convert_to_fp8: forward against a float64 reference, state_dict round trip, bad inputs."""

from __future__ import annotations

import io

import pytest
import torch
from fp8_gemm import FP8Linear, clear_caches, convert_to_fp8, fp8_linear, quantize_fp8
from fp8_gemm.reference import fp8_matmul_reference, quantize_fp8_reference
from torch import nn
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from triton_ops_core.testing import assert_close_rel

# Output rounding only: relative Frobenius error of rounding to the output dtype, with margin.
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}


def _linear(in_f, out_f, bias, device, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, device=device)
    return lin


def _reference(mod: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, mod.in_features)
    a_q, a_s = quantize_fp8_reference(x2, "e4m3", mod.activation_granularity)
    out = fp8_matmul_reference(a_q, mod.weight.t(), a_s, mod.weight_scale, mod.bias)
    return out.reshape(*x.shape[:-1], mod.out_features)


@pytest.mark.parametrize(
    ("w_gran", "a_gran"),
    [("channel", "row"), ("tensor", "tensor"), ("block", "block"), ("channel", "block"), ("block", "row"),
     ("group", "block"), ("group", "row")],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_matches_reference(device, w_gran, a_gran, dtype):
    lin = _linear(200, 136, True, device)
    mod = FP8Linear.from_linear(lin, weight_granularity=w_gran, activation_granularity=a_gran)
    mod.path = "w8a8"  # 15 rows would take the weight-only decode kernel (tests/test_weight_only.py)
    x = torch.randn(3, 5, 200, device=device).to(dtype)
    out = mod(x)
    assert out.dtype == dtype and out.shape == (3, 5, 136)
    assert_close_rel(out, _reference(mod, x), TOL[dtype], f"FP8Linear({w_gran}, {a_gran}) {dtype}")
    # The weight the GEMM uses is the quantized one, close to the original (E4M3: 2**-4 relative at worst).
    assert_close_rel(mod.dequantized_weight(), lin.weight.detach(), 0.05, "dequantized weight")


def test_weight_quantization_is_per_output_feature(device):
    lin = _linear(256, 64, False, device)
    with torch.no_grad():
        lin.weight[3] *= 1000  # one huge output row must not coarsen the others
    mod = FP8Linear.from_linear(lin)
    mod.path = "w8a8"  # the W8A8 reference below; 7 rows would take the weight-only decode kernel
    assert mod.bias is None and mod.weight.shape == (64, 256) and mod.weight.is_contiguous()
    assert mod.weight_scale.shape == (1, 64)
    q_ref, s_ref = quantize_fp8_reference(lin.weight.detach().t(), "e4m3", "channel")
    assert torch.equal(mod.weight_scale, s_ref)
    assert torch.equal(mod.weight.view(torch.uint8), q_ref.t().contiguous().view(torch.uint8))
    x = torch.randn(7, 256, device=device)
    assert_close_rel(mod(x), _reference(mod, x), TOL[torch.float32])


@pytest.mark.parametrize("w_gran", ["channel", "tensor", "block", "group"])
def test_state_dict_round_trip(device, w_gran):
    lin = _linear(160, 130, True, device, seed=3)
    mod = FP8Linear.from_linear(lin, weight_granularity=w_gran)
    sd = mod.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight_scale"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = FP8Linear(160, 130, weight_granularity=w_gran, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.weight.view(torch.uint8), mod.weight.view(torch.uint8))
    assert torch.equal(fresh.weight_scale, mod.weight_scale)
    x = torch.randn(4, 160, device=device, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), mod(x))
    # A module of another weight granularity has another scale shape: loading must fail loudly.
    if w_gran != "block":
        other = FP8Linear(160, 130, weight_granularity="block", device=device)
        with pytest.raises(RuntimeError, match="weight_scale"):
            other.load_state_dict(sd)


def test_group_weights_have_a_scale_per_output_feature_and_128_inputs(device):
    lin = _linear(300, 72, False, device, seed=5)
    with torch.no_grad():
        lin.weight[3, :128] *= 1000  # one huge group must coarsen neither its row's other groups nor other rows
    mod = FP8Linear.from_linear(lin, weight_granularity="group")
    assert mod.weight_scale.shape == (3, 72) and mod.weight_scale.is_contiguous()
    q_ref, s_ref = quantize_fp8_reference(lin.weight.detach().t(), "e4m3", "group")
    assert torch.equal(mod.weight_scale, s_ref)
    assert torch.equal(mod.weight.view(torch.uint8), q_ref.t().contiguous().view(torch.uint8))
    assert mod.weight_scale[0, 3] > 100 * mod.weight_scale[1, 3]
    assert_close_rel(mod.dequantized_weight()[3, 128:], lin.weight.detach()[3, 128:], 0.05, "row 3 past group 0")
    x = torch.randn(5, 300, device=device)
    for path in ("w8a8", "weight_only"):
        mod.path = path
        out = mod(x)
        ref = _reference(mod, x) if path == "w8a8" else x.double() @ mod.dequantized_weight(torch.float64).t()
        assert_close_rel(out, ref, TOL[torch.float32], path)


def test_nan_in_activation_is_quantized_to_nan_without_touching_other_rows(device):
    mod = FP8Linear.from_linear(_linear(64, 32, True, device))
    x = torch.randn(4, 64, device=device)
    x[1, 5] = float("nan")
    a_q, a_s = quantize_fp8(x, "e4m3", "row")
    assert a_q.float()[1, 5].isnan() and torch.isfinite(a_s).all()
    out = mod(x)
    assert torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.gpu
def test_nan_in_activation_propagates_to_its_output_row(device):
    # Under the interpreter the GEMM reads the FP8 NaN pattern as a finite number (its FP8 upcast), so only a
    # compiled kernel can show the propagation.
    mod = FP8Linear.from_linear(_linear(64, 32, True, device))
    x = torch.randn(4, 64, device=device)
    x[1, 5] = float("nan")
    out = mod(x)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2, 3]]).all()


def test_convert_to_fp8_replaces_every_linear(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Sequential(nn.Linear(128, 128), nn.ReLU()), nn.Linear(128, 32)
    ).to(device)
    x = torch.randn(6, 64, device=device)
    ref = model(x).detach()
    convert_to_fp8(model)
    kinds = [type(m) for m in model.modules()]
    assert nn.Linear not in kinds and kinds.count(FP8Linear) == 3
    out = model(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.995
    keep = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).to(device)
    convert_to_fp8(keep, filter_fn=lambda name, lin: name != "1")
    assert isinstance(keep[0], FP8Linear) and type(keep[1]) is nn.Linear
    assert isinstance(convert_to_fp8(nn.Linear(16, 16).to(device)), FP8Linear)


def test_bad_inputs(device):
    mod = FP8Linear.from_linear(_linear(64, 32, True, device))
    with pytest.raises(ShapeMismatchError, match="x: expected last dimension 64"):
        mod(torch.randn(4, 63, device=device))
    with pytest.raises(UnsupportedDtypeError, match="x: expected dtype"):
        mod(torch.ones(4, 64, device=device, dtype=torch.int32))
    with pytest.raises(InvalidArgumentError, match="x: expected a torch.Tensor"):
        mod([1.0] * 64)
    with pytest.raises(InvalidArgumentError, match="weight_granularity"):
        FP8Linear(64, 32, weight_granularity="row")
    with pytest.raises(InvalidArgumentError, match="activation_granularity"):
        FP8Linear(64, 32, activation_granularity="channel")
    with pytest.raises(InvalidArgumentError, match="in_features"):
        FP8Linear(0, 32)
    with pytest.raises(InvalidArgumentError, match="out_features"):
        FP8Linear(8, True)
    with pytest.raises(UnsupportedDtypeError, match="dtype"):
        FP8Linear(8, 8, dtype=torch.int8)
    with pytest.raises(InvalidArgumentError, match="linear: expected an nn.Linear"):
        FP8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ShapeMismatchError, match=r"weight: expected shape \[32, 64\]"):
        mod.load_weight(torch.randn(64, 32, device=device))
    with pytest.raises(InvalidArgumentError, match="model: expected an nn.Module"):
        convert_to_fp8("model")


def _scale_out_in(mod: FP8Linear) -> torch.Tensor:
    """A module's [K, N]-oriented weight scale as a checkpoint stores it: in the weight's [out, in] orientation."""
    if mod.weight_granularity == "tensor":
        return mod.weight_scale.reshape(())
    if mod.weight_granularity == "channel":
        return mod.weight_scale.reshape(mod.out_features)
    return mod.weight_scale.t().contiguous()


@pytest.mark.parametrize(("w_gran", "a_gran"), [("block", "block"), ("group", "block"), ("channel", "row"),
                                                ("tensor", "row")])
@pytest.mark.parametrize("path", ["auto", "w8a8"])
def test_from_quantized_adopts_a_checkpoint_weight_as_our_own_quantization(device, w_gran, a_gran, path):
    # 136 x 200: neither multiple of 128, so block, group and channel scales differ in shape
    lin = _linear(200, 136, True, device, seed=3)
    ours = FP8Linear.from_linear(lin, weight_granularity=w_gran, activation_granularity=a_gran)
    weight = ours.weight.clone()
    adopted = FP8Linear.from_quantized(weight, _scale_out_in(ours), lin.bias, activation_granularity=a_gran)
    assert adopted.weight.data_ptr() == weight.data_ptr()  # shared, not copied
    assert adopted.weight_granularity == w_gran and adopted.weight_scale.shape == ours.weight_scale.shape
    assert torch.equal(adopted.weight_scale, ours.weight_scale) and adopted.weight_scale.is_contiguous()
    assert not adopted.bias.requires_grad and torch.equal(adopted.bias, lin.bias)
    ours.path = adopted.path = path
    x = torch.randn(2, 3, 200, device=device, dtype=torch.bfloat16)
    out = adopted(x)
    assert torch.equal(out, ours(x)), "the adopted weight computes what quantizing the float weight computes"
    assert_close_rel(adopted.dequantized_weight(), lin.weight.detach(), 0.05, "dequantized weight")


def test_from_quantized_reads_power_of_two_e8m0_scales_and_per_channel_columns(device):
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")
    torch.manual_seed(5)
    weight = (torch.randn(256, 384, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    exponents = torch.randint(-12, -2, (2, 3), device=device).float()
    scale = torch.exp2(exponents).to(torch.float8_e8m0fnu)
    mod = FP8Linear.from_quantized(weight, scale, activation_granularity="block")
    assert mod.weight_granularity == "block" and mod.bias is None
    assert torch.equal(mod.weight_scale, torch.exp2(exponents).t())  # powers of two: exact in float32
    expected = weight.float() * torch.exp2(exponents).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(mod.dequantized_weight(), expected)
    column = FP8Linear.from_quantized(weight, torch.rand(256, 1, device=device) + 0.5)
    assert column.weight_granularity == "channel" and column.weight_scale.shape == (1, 256)


def test_from_quantized_bad_inputs(device):
    weight = torch.randn(64, 200, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(1, 2, device=device)  # 128x128 blocks of a [64, 200] weight
    with pytest.raises(UnsupportedDtypeError, match="weight: expected dtype"):
        FP8Linear.from_quantized(weight.to(torch.float8_e5m2), scale)
    with pytest.raises(UnsupportedDtypeError, match="weight: expected dtype"):
        FP8Linear.from_quantized(weight.float(), scale)
    with pytest.raises(UnsupportedDtypeError, match="weight_scale: expected dtype"):
        FP8Linear.from_quantized(weight, scale.to(torch.int32))
    with pytest.raises(ShapeMismatchError, match=r"weight_scale: expected one element .* got \[2, 1\]"):
        FP8Linear.from_quantized(weight, scale.t())  # the [K, N] orientation: not a checkpoint's
    with pytest.raises(InvalidArgumentError, match="weight_scale: expected finite scales"):
        FP8Linear.from_quantized(weight, torch.tensor([[1.0, float("nan")]], device=device))
    with pytest.raises(InvalidArgumentError, match="weight_scale: expected finite scales"):
        FP8Linear.from_quantized(weight, -scale)
    with pytest.raises(ShapeMismatchError, match=r"bias: expected shape \[64\]"):
        FP8Linear.from_quantized(weight, scale, torch.zeros(200, device=device))
    with pytest.raises(ShapeMismatchError, match="weight"):
        FP8Linear.from_quantized(weight[0], scale)
    with pytest.raises(InvalidArgumentError, match="weight: expected a torch.Tensor"):
        FP8Linear.from_quantized("weight", scale)


def test_unsupported_gpu_raises_unsupported_dtype(device, monkeypatch):
    import fp8_gemm.linear as linear_mod
    import fp8_gemm.quantize as quant_mod

    mod = FP8Linear.from_linear(_linear(32, 16, True, device))
    monkeypatch.setattr(linear_mod, "supports_fp8", lambda d=None: False)
    monkeypatch.setattr(quant_mod, "supports_fp8", lambda d=None: False)
    monkeypatch.setattr(quant_mod, "_FP8_OK", {})  # the per-device answer is cached on the GPU path
    clear_caches()  # the capability is checked on a call signature's first call
    with pytest.raises(UnsupportedDtypeError, match="FP8 tensor cores"):
        mod(torch.randn(2, 32, device=device))
    with pytest.raises(UnsupportedDtypeError, match="FP8 tensor cores"):
        FP8Linear.from_linear(_linear(32, 16, True, device))
    with pytest.raises(UnsupportedDtypeError, match="FP8"):
        quantize_fp8(torch.randn(2, 32, device=device))


def test_from_linear_on_the_meta_device_says_so():
    with torch.device("meta"):
        lin = nn.Linear(64, 32)
    with pytest.raises(UnsupportedDeviceError, match=r"^weight: on the meta device"):
        FP8Linear.from_linear(lin)


def test_trainable_fp8_linear_gradients_against_float64(device):
    """Input gradient through the quantized weight; weight and bias gradients in high precision."""
    from fp8_gemm import TrainableFP8Linear
    from fp8_gemm.quantize import expand_scale

    lin = _linear(64, 24, True, device, seed=5)
    layer = TrainableFP8Linear(lin)
    assert layer.weight is lin.weight  # the trained parameter itself
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    g = torch.randn(2, 5, 24, device=device)
    out = layer(x)
    out.backward(g)
    w_q, w_s = quantize_fp8(lin.weight.detach().t(), "e4m3", "channel", role="weight")
    w_deq = (w_q.double() * expand_scale(w_s, (64, 24)).double()).t()  # [out, in]
    assert_close_rel(x.grad, g.double() @ w_deq, 1e-5, "dx")
    assert_close_rel(lin.weight.grad, g.double().reshape(-1, 24).t() @ x.detach().double().reshape(-1, 64), 1e-5,
                     "dweight")
    assert_close_rel(lin.bias.grad, g.double().sum((0, 1)), 1e-5, "dbias")
    # the forward is FP8Linear's on the freshly quantized weight
    assert torch.equal(out.detach(), layer.to_inference()(x.detach()))


def test_fine_tuning_with_trainable_fp8_follows_the_float_model(device):
    def train(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
        if fp8:
            convert_to_fp8(model, trainable=True)
        x, target = torch.randn(16, 32, device=device), torch.randn(16, 8, device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fp8, ref = train(True), train(False)
    assert all(b < a for a, b in zip(fp8, fp8[1:])), fp8  # every step lowers the loss
    assert abs(fp8[-1] - ref[-1]) < 0.05 * ref[-1] and fp8[-1] < 0.85 * fp8[0], (fp8, ref)


def test_the_remembered_plan_follows_every_change_of_the_call(device):
    """FP8Linear reuses its previous call's plan only for the same input layout, tensors and options."""
    torch.manual_seed(5)
    mod = FP8Linear.from_linear(_linear(96, 40, True, device, seed=5))

    def check(x, what):
        out = mod(x)
        assert torch.equal(out, fp8_linear(x, mod.weight, mod.weight_scale, mod.bias, mod.activation_granularity,
                                           mod.fast_accum, mod.path)), what
        assert_close_rel(out, _reference_any_path(mod, x), 0.05, what)
        return out

    with torch.no_grad():
        x = torch.randn(1, 96, device=device, dtype=torch.bfloat16)
        first = check(x, "first call")
        assert mod._last_call is not None
        again = check(x.clone(), "same layout")
        assert torch.equal(first, again)
        check(torch.randn(3, 96, device=device, dtype=torch.bfloat16), "more rows")
        check(torch.randn(96, 2, device=device, dtype=torch.bfloat16).t(), "strided rows")
        check(torch.randn(1, 96, device=device, dtype=torch.float16), "another dtype")
        mod.path = "w8a8"
        check(x, "another path")
        mod.path = "auto"
        mod.load_weight(torch.randn(40, 96, device=device) * 3)  # new buffers: planned afresh, new values used
        assert not torch.equal(check(x, "a loaded weight"), first)
        mod.bias.data = torch.randn(40, device=device, dtype=torch.float16)  # same Parameter, new dtype
        check(x, "a bias of another dtype")
        # same buffer objects, other tensors behind them: per-tensor scales where per-channel ones were
        weight, scale = mod.weight, mod.weight_scale
        weight.data = (torch.randn(40, 96, device=device) * 0.5).to(torch.float8_e4m3fn)
        scale.data = torch.full((1,), 0.25, device=device)
        assert mod.weight is weight and mod.weight_scale is scale
        check(x, "a weight and scale swapped by .data")
        clear_caches()
        check(x, "after clear_caches")


def _reference_any_path(mod: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """x times the dequantized weight plus bias, in float64 (either path is within FP8 activation rounding)."""
    w = mod.dequantized_weight(torch.float64)
    out = x.double() @ w.t() + mod.bias.double()
    return out


def test_a_copy_or_pickle_does_not_carry_the_remembered_plan(device):
    import copy

    mod = FP8Linear.from_linear(_linear(64, 24, False, device))
    x = torch.randn(1, 64, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = mod(x)
        twin = copy.deepcopy(mod)
        assert "_last_call" not in twin.__dict__ and "_last_call" in mod.__dict__
        assert torch.equal(twin(x), out)
        buf = io.BytesIO()
        torch.save(mod, buf)  # the whole module, pickled
        buf.seek(0)
        thawed = torch.load(buf, weights_only=False)
        assert "_last_call" not in thawed.__dict__
        assert torch.equal(thawed(x), out)
