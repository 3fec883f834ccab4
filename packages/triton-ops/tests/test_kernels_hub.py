"""The Hugging Face ``kernels`` route (docs/kernels-hub.md): triton-ops written as a local kernel repository
(triton_ops.hub), swapped into small random Llama and Qwen3 models built from transformers' own classes by
``kernels.kernelize`` and by transformers' ``KernelConfig``; the kernelized model computes what the model computes.

transformers tags its layers (``@use_kernel_forward_from_hub("RMSNorm")``) only when it supports the installed
``kernels`` release; otherwise its decorator is a no-op. The ``kernels`` tests then tag the same classes by hand,
under the name transformers' source gives them (checked), and untag them afterwards; the transformers tests skip.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import sys

import pytest
import torch
import triton_ops.layers as our_layers
from triton_ops import hub
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import device_for_tests

kernels = pytest.importorskip("kernels", reason="Hugging Face's `kernels` is not installed (pip install kernels)")
transformers = pytest.importorskip("transformers")

from kernels import Mode, kernelize, use_kernel_mapping  # noqa: E402
from packaging.version import Version  # noqa: E402  (a dependency of kernels and transformers)
from transformers.utils.import_utils import is_kernels_available  # noqa: E402

if Version(kernels.__version__) < Version("0.17"):
    pytest.skip(f"kernels {kernels.__version__}: the route is built for kernels >= 0.17 (kernels 0.10 loads no local "
                f"kernel on a CPU-only torch)", allow_module_level=True)

DEVICE = device_for_tests()
DTYPE = torch.float32
ATOL = RTOL = 1e-4
# transformers tags its classes only when it supports this kernels release (5.18 to 5.22 do 0.17.x, 5.24 wants 0.18+)
TRANSFORMERS_TAGS = is_kernels_available()
NO_TRANSFORMERS_ROUTE = (f"transformers {transformers.__version__} does not support kernels {kernels.__version__} "
                         f"(its kernel decorators and use_kernels are off then); the KernelConfig route needs a pair "
                         f"it supports")
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
NORMS = {"llama": "transformers.models.llama.modeling_llama:LlamaRMSNorm",
         "qwen3": "transformers.models.qwen3.modeling_qwen3:Qwen3RMSNorm"}
MLP = "transformers.models.llama.modeling_llama:LlamaMLP"


def _cls(ref: str) -> type:
    module, name = ref.split(":")
    __import__(module)
    return getattr(sys.modules[module], name)


def _hub_name_in_source(cls: type) -> str | None:
    """The name transformers' source tags ``cls`` with (``@use_kernel_forward_from_hub("...")``), if any."""
    source = inspect.getsource(sys.modules[cls.__module__])
    m = re.search(rf'@use_kernel_forward_from_hub\("(\w+)"\)\s*\nclass {cls.__name__}\b', source)
    return m.group(1) if m else None


@contextlib.contextmanager
def _tagged(*pairs: tuple[type, str]):
    """Each class tagged with its kernels layer name, as transformers' decorator does; by hand (undone after) where
    transformers did not."""
    added = []
    for cls, name in pairs:
        if "kernel_layer_name" in cls.__dict__:
            assert cls.kernel_layer_name == name
        else:
            kernels.replace_kernel_forward_from_hub(cls, name)
            added.append(cls)
    try:
        yield
    finally:
        for cls in added:
            for attr in ("kernel_layer_name", "kernel_condition"):
                if attr in cls.__dict__:
                    delattr(cls, attr)


def _ours_only(mapping):
    """Our mapping alone (not merged into one that transformers' use_kernels registered, with Hub repositories)."""
    return use_kernel_mapping(mapping, inherit_mapping=False)


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[kind])(CONFIGS[kind]()).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits are not all alike, norms' weights not all one
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.08)
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return hub.write_kernel_repository(tmp_path_factory.mktemp("hub") / "triton_ops", backends=hub.BACKENDS)


@pytest.fixture
def count_rmsnorm(monkeypatch):
    """How many times our RMSNorm layer's kernel entry point (fused_rmsnorm_rope.rmsnorm) was called."""
    calls = []
    real = our_layers.rmsnorm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(our_layers, "rmsnorm", counting)
    return calls


def _norms(model, norm_cls: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, norm_cls)]


def _is_ours(module: torch.nn.Module, layer: type) -> bool:
    """kernelize binds the layer's forward to the module (an instance attribute)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is layer.forward


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_hub_names_are_the_ones_transformers_gives(kind):
    cls = _cls(NORMS[kind])
    assert _hub_name_in_source(cls) == "RMSNorm" and hub.LAYERS["RMSNorm"] == "RMSNorm"
    if TRANSFORMERS_TAGS:
        assert cls.kernel_layer_name == "RMSNorm"
    assert _hub_name_in_source(_cls(MLP)) is None  # no gated MLP is tagged: GatedMLP is tagged by hand (below)


def _kernels_private(name: str):
    """A private module of ``kernels`` (these tests check our layers with its own checks): ``kernels.<name>`` up to
    0.18, ``kernels._internals.<name>`` from 0.19."""
    import importlib

    for prefix in ("kernels._internals.", "kernels."):
        try:
            return importlib.import_module(prefix + name)
        except ModuleNotFoundError:
            continue
    raise AssertionError(f"kernels {kernels.__version__}: no module {name} (its private layout changed again)")


def test_layers_follow_the_kernels_layer_contract():
    """What kernelize checks before it swaps (no __init__, no members but the two flags, the forward's signature),
    and flags that are true: both ops are registered custom ops with a fake (compile) and an autograd formula."""
    _validate_layer = _kernels_private("layer.layer")._validate_layer

    pairs = [(our_layers.RMSNorm, _cls(NORMS["llama"])), (our_layers.RMSNorm, _cls(NORMS["qwen3"])),
             (our_layers.GatedMLP, _cls(MLP))]
    if hasattr(transformers, "Qwen3_5ForCausalLM"):
        pairs.append((our_layers.GemmaRMSNorm, _cls("transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5RMSNorm")))
    for layer, host in pairs:
        _validate_layer(check_cls=host, cls=layer, repo=f"triton-ops:{layer.__name__}")
        assert layer.can_torch_compile is True and layer.has_backward is True


def test_repository_layout_and_command(tmp_path, capsys):
    path = tmp_path / "triton_ops"
    assert hub.main([str(path), "--backend", "cuda", "--backend", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(path.resolve())
    for backend in hub.BACKENDS:
        variant = path / "build" / f"torch-{backend}"
        meta = kernels.Metadata.read_from_file(variant / "metadata.json")  # what kernels parses
        assert str(meta.name) == hub.KERNEL_NAME and json.loads((variant / "metadata.json").read_text())["backend"] == {
            "type": backend}
        assert (variant / "triton_ops" / "__init__.py").is_file()
    # kernels loads the variant of this torch build (torch-cpu for a CPU build); its layers are ours
    assert kernels.get_local_kernel(path).layers is our_layers
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        hub.write_kernel_repository(path)
    assert hub.write_kernel_repository(path, overwrite=True) == path.resolve()
    assert [p.name for p in (path / "build").iterdir()] == ["torch-cuda"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(InvalidArgumentError, match="not a repository written by triton-ops"):
        hub.write_kernel_repository(tmp_path / "other", overwrite=True)
    with pytest.raises(InvalidArgumentError, match="backends"):
        hub.write_kernel_repository(tmp_path / "r", backends=("rocm",))
    with pytest.raises(InvalidArgumentError, match="layers"):
        hub.kernel_mapping(path, layers=("MLP",))
    assert hub.main([str(path)]) == 2 and "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_kernelize_swaps_our_rmsnorm_in(kind, repo, count_rmsnorm):
    norm_cls = _cls(NORMS[kind])
    model = _model(kind)
    expected = _logits(model)
    with _tagged((norm_cls, "RMSNorm")), _ours_only(hub.kernel_mapping(repo, devices=(DEVICE.type,))):
        kernelize(model, mode=Mode.INFERENCE, device=DEVICE.type)
    norms = _norms(model, norm_cls)
    # Llama: 2 per layer + the final norm; Qwen3 adds its q_norm and k_norm per layer
    assert len(norms) == {"llama": 5, "qwen3": 9}[kind]
    assert all(_is_ours(m, our_layers.RMSNorm) for m in norms)
    got = _logits(model)
    assert len(count_rmsnorm) == len(norms)  # every norm ran our kernel, once
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not hasattr(transformers, "Qwen3_5ForCausalLM"), reason="this transformers has no Qwen3.5")
def test_kernelize_swaps_our_zero_centered_norm_into_qwen3_5(repo, count_rmsnorm):
    """Qwen3.5's norms scale by 1 + weight (transformers tags them "RMSNormZeroCentered"): GemmaRMSNorm stands in for
    them (its eps, its weight), the DeltaNet's gated norms (another tag) stay, and the model computes the same."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    torch.manual_seed(3)
    config = transformers.Qwen3_5TextConfig(**SMALL, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                                            linear_key_head_dim=16, linear_value_head_dim=16,
                                            layer_types=["linear_attention", "full_attention"])
    model = transformers.Qwen3_5ForCausalLM(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # zero-centered norms: weights around 0
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.2)
    expected = _logits(model)
    with _tagged((Qwen3_5RMSNorm, "RMSNormZeroCentered")), _ours_only(hub.kernel_mapping(repo, devices=(DEVICE.type,))):
        kernelize(model, mode=Mode.INFERENCE, device=DEVICE.type)
    norms = _norms(model, Qwen3_5RMSNorm)
    assert len(norms) == 2 * 2 + 1 + 2  # two layers' two norms, the final norm, the full attention's q/k norms
    assert all(_is_ours(m, our_layers.GemmaRMSNorm) for m in norms)
    got = _logits(model)
    assert len(count_rmsnorm) == len(norms)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_training_mode_keeps_our_layer_and_its_gradients(repo, count_rmsnorm):
    """has_backward is true: kernelize(mode=TRAINING) keeps our layer, and the gradients are the model's."""
    norm_cls = _cls(NORMS["llama"])
    ref, model = _model("llama"), _model("llama")
    with _tagged((norm_cls, "RMSNorm")), _ours_only(hub.kernel_mapping(repo, devices=(DEVICE.type,))):
        kernelize(model.train(), mode=Mode.TRAINING, device=DEVICE.type)
    assert all(_is_ours(m, our_layers.RMSNorm) for m in _norms(model, norm_cls))
    for m in (ref.train(), model):
        m(_ids(), labels=_ids()).loss.backward()
    assert count_rmsnorm
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-3, msg=name)


def test_compile_mode_keeps_our_layer_in_one_graph(repo):
    """can_torch_compile is true: kernelize(mode=INFERENCE | TORCH_COMPILE) keeps our layer, and torch.compile traces
    it whole (fullgraph) to our one op."""
    from torch._dynamo.testing import CompileCounter

    norm_cls = _cls(NORMS["llama"])
    torch.manual_seed(0)
    norm = norm_cls(64, eps=1e-5).to(DEVICE)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64, device=DEVICE)
    expected = norm(x)
    with _tagged((norm_cls, "RMSNorm")), _ours_only(hub.kernel_mapping(repo, devices=(DEVICE.type,))):
        kernelize(norm, mode=Mode.INFERENCE | Mode.TORCH_COMPILE, device=DEVICE.type, use_fallback=False)
    assert _is_ours(norm, our_layers.RMSNorm)
    counter = CompileCounter()
    with torch.no_grad():
        got = torch.compile(norm, backend=counter, fullgraph=True)(x)
    assert (counter.frame_count, counter.op_count) == (1, 1)
    torch.testing.assert_close(got, expected.detach(), atol=ATOL, rtol=RTOL)


def test_gated_mlp_through_a_hand_tagged_mlp(repo):
    """transformers tags no gated MLP; tagged by hand (kernels.replace_kernel_forward_from_hub), LlamaMLP takes our
    GatedMLP from the same repository."""
    norm_cls, mlp_cls = _cls(NORMS["llama"]), _cls(MLP)
    model = _model("llama")
    expected = _logits(model)
    mapping = hub.kernel_mapping(repo, devices=(DEVICE.type,), layers=("RMSNorm", "GatedMLP"))
    with _tagged((norm_cls, "RMSNorm"), (mlp_cls, "GatedMLP")), _ours_only(mapping):
        kernelize(model, mode=Mode.INFERENCE, device=DEVICE.type)
    mlps = [m for m in model.modules() if isinstance(m, mlp_cls)]
    assert len(mlps) == 2 and all(_is_ours(m, our_layers.GatedMLP) for m in mlps)
    assert all(_is_ours(m, our_layers.RMSNorm) for m in _norms(model, norm_cls))
    torch.testing.assert_close(_logits(model), expected, atol=ATOL, rtol=RTOL)


@pytest.fixture
def kernel_device_label(monkeypatch):
    """The device transformers' KernelConfig route is told. Its list of kernel devices has no "cpu", so on the CPU
    the model is labelled "cuda" (transformers' infer_device and get_device_type) and kernels' CUDA capability lookup
    answers 9.0; what is loaded and run is unchanged (kernels picks the variant by torch's build: torch-cpu)."""
    if DEVICE.type == "cpu":
        import transformers.integrations.hub_kernels as hub_kernels
        import transformers.utils.kernel_config as kernel_config

        monkeypatch.setattr(kernel_config, "infer_device", lambda model: "cuda")
        monkeypatch.setattr(hub_kernels, "get_device_type", lambda device=None: "cuda")
        # (kernels 0.19 passes a device index; earlier releases nothing)
        monkeypatch.setattr(_kernels_private("layer.repos"), "_find_capability", lambda device_index=None: 90)
    return "cuda" if DEVICE.type == "cpu" else DEVICE.type


@pytest.mark.skipif(not TRANSFORMERS_TAGS, reason=NO_TRANSFORMERS_ROUTE)
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformers_kernel_config_swaps_our_rmsnorm_in(kind, repo, kernel_device_label, count_rmsnorm):
    norm_cls = _cls(NORMS[kind])
    model = _model(kind)
    expected = _logits(model)
    model.set_use_kernels(True, hub.kernel_config(repo, device=kernel_device_label))
    norms = _norms(model, norm_cls)
    assert norms and all(_is_ours(m, our_layers.RMSNorm) for m in norms)
    got = _logits(model)
    assert len(count_rmsnorm) == len(norms)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not TRANSFORMERS_TAGS, reason=NO_TRANSFORMERS_ROUTE)
def test_from_pretrained_with_a_local_kernel_config(repo, kernel_device_label, tmp_path):
    model = _model("llama")
    expected = _logits(model)
    model.save_pretrained(tmp_path / "model")
    try:
        # a device_map needs accelerate from transformers 5.25 on (not a dependency here); a CPU load needs none
        placement = {} if DEVICE.type == "cpu" else {"device_map": DEVICE.type}
        loaded = transformers.LlamaForCausalLM.from_pretrained(
            tmp_path / "model", dtype=DTYPE, use_kernels=True,
            kernel_config=hub.kernel_config(repo, device=kernel_device_label), **placement)
    except AttributeError as e:
        if "'tuple' object has no attribute 'split'" not in str(e):
            raise
        pytest.xfail(f"transformers {transformers.__version__}: from_pretrained rewrites a local KernelConfig's "
                     f"mapping into (repo, metadata) tuples that its own add_to_mapping_local cannot read; "
                     f"model.set_use_kernels(True, kernel_config) works")
    assert all(_is_ours(m, our_layers.RMSNorm) for m in _norms(loaded, _cls(NORMS["llama"])))
    torch.testing.assert_close(_logits(loaded.eval()), expected, atol=ATOL, rtol=RTOL)
