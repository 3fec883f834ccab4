"""For kernel packages' tests (free of pytest): the check they run on their own tunable family, and device records to
simulate GPUs that are not there (``triton_ops_core.device.simulate_device``)."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch
from triton_ops_core.device import DeviceInfo

from .registry import ENTRY_POINT_GROUP, Tunable, available_tunables, get_tunable

# What torch reports for the two lent GPUs (bandwidth: the copy bandwidth measured on each), and a GPU unlike both
# (few SMs, Ampere-class shared memory) for heuristics that must read the properties.
H100_SXM = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 227 * 1024, 3017.0, True, "simulated")
H200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
# A Hopper-class GPU no package ships configs for (the H200 has shipped entries since it was tuned): what an untuned
# device sees (the warning, the heuristics, tuning on first use)
UNTUNED_HOPPER = DeviceInfo("Simulated untuned Hopper GPU", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True,
                            "simulated")
SMALL_GPU = DeviceInfo("Simulated small GPU", (8, 6), 28, 4 * 2**20, 99 * 1024, 400.0, True, "simulated")


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


def check_shipped_served(name: str, device: torch.device) -> tuple[int, int]:
    """Run every benchmark shape of family ``name`` once on ``device`` and assert that each kernel call whose problem
    has a shipped entry for this GPU (product name and compute capability) was served that entry: source
    ``"shipped"``, the shipped config. Call it with an empty cache directory and ``TRITON_OPS_AUTOTUNE=0``.
    Returns (calls served from the shipped file, the file's entries for this GPU)."""
    from . import cache as _cache
    from .keys import device_identity, make_key
    from .select import _MEMO, clear_memo

    tunable = get_tunable(name)
    identity = device_identity(device)
    mine = [e for e in _cache.read_entries(tunable.shipped).values()
            if (e["key"].get("device"), e["key"].get("capability")) == identity]
    if tunable.requires_gpu_feature is not None and tunable.requires_gpu_feature(device):
        return 0, len(mine)
    clear_memo()
    if tunable.reset is not None:
        tunable.reset()
    for shape in tunable.shapes:
        tunable.prepare(shape, device)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    served = 0
    for (kernel, version, items, dtypes, dev), (config, source) in list(_MEMO.items()):
        if not tunable.owns(kernel):
            continue
        # the memo's problem is already bucketed: the key select_config built
        key = make_key(kernel, version=version, problem=dict(items), dtypes=dtypes, device=dev)
        entry = _cache.lookup(tunable.shipped, key, relaxed=True)
        if entry is None:
            continue
        assert source == "shipped" and config == entry["config"], (
            f"{kernel} {dict(items)} on {identity}: got {config} ({source}), shipped {entry['config']}")
        served += 1
    return served, len(mine)


__all__ = ["H100_SXM", "H200", "SMALL_GPU", "UNTUNED_HOPPER", "check_family", "check_shipped_served"]
