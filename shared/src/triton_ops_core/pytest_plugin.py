"""pytest plugin shared by every triton-ops package's tests, loaded by their test commands with
``-p triton_ops_core.pytest_plugin`` (nox and ``.ci/gpu`` pass it). It is deliberately no ``pytest11`` entry point:
installing triton-ops-core must not change how other projects' tests run.

- On a machine without a usable GPU it sets ``TRITON_INTERPRET=1`` before test modules import triton, so
  kernels run on CPU tensors through Triton's interpreter.
- ``@pytest.mark.gpu`` marks tests that need a compiled kernel on a GPU; they are skipped, with a reason,
  under the interpreter.
- Hypothesis profiles: ``interpreter`` (default without a GPU: no deadline, few examples, since each program
  instance costs about a millisecond) and ``gpu``. ``HYPOTHESIS_PROFILE`` overrides the choice.
- The ``device`` fixture is the device kernels run on in this session.
- ``TRITON_OPS_AUTOTUNE`` defaults to ``0`` (no tuning on first use) unless the environment sets it.
"""

from __future__ import annotations

import os


def _gpu_visible() -> bool:
    # Decided without importing torch's CUDA state: an explicit choice wins, else ask torch.
    if os.environ.get("TRITON_INTERPRET", "").strip() in {"1", "true", "yes", "on"}:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _gpu_visible():
    os.environ["TRITON_INTERPRET"] = "1"
# Tests never tune on first use (a GPU without shipped configs would otherwise search every shape a test meets, up to
# 10 s each): they run the shipped configs or the heuristics. Tests of the tuning itself set the variable themselves.
os.environ.setdefault("TRITON_OPS_AUTOTUNE", "0")

import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "interpreter",
        max_examples=12,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    # CI (.ci/run sets HYPOTHESIS_PROFILE=ci): the interpreter profile with a fixed example sequence, so a gate
    # that decides whether a change lands cannot fail on a draw it never saw before. Local runs keep exploring.
    settings.register_profile("ci", settings.get_profile("interpreter"), derandomize=True)
    settings.register_profile("gpu", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if _gpu_visible() else "interpreter"))
except ImportError:  # hypothesis is optional for running the plain tests
    pass


# Warnings that Triton's interpreter raises from its own numpy code on every interpreted program, thousands per
# session: numpy >= 1.25 deprecates its array-to-scalar conversions (triton/runtime/interpreter.py), and NaN/Inf
# inputs, which tests feed on purpose, make its numpy arithmetic warn. They say nothing about our code.
INTERPRETER_WARNINGS = (
    "ignore:Conversion of an array with ndim > 0 to a scalar is deprecated:DeprecationWarning",
    "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter",
    "ignore:overflow encountered:RuntimeWarning:triton.runtime.interpreter",
    "ignore:divide by zero encountered:RuntimeWarning:triton.runtime.interpreter",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a compiled kernel on a CUDA GPU (skipped under the interpreter)")
    config.addinivalue_line("markers", "slow: long-running even on a GPU")
    config.addinivalue_line(
        "markers", "newest_only: in CI's test matrix, run only beside the newest triton and transformers (benchmark "
                   "harnesses, a second multi-process run): the oldest pair's sessions deselect it")
    if os.environ.get("TRITON_INTERPRET") == "1":
        for spec in INTERPRETER_WARNINGS:
            config.addinivalue_line("filterwarnings", spec)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from .device import has_gpu, is_interpreter

    if has_gpu() and not is_interpreter():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (running under the Triton interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on here: ``cuda`` on a GPU, else ``cpu`` (interpreter)."""
    from .testing import device_for_tests

    return device_for_tests()


def pytest_report_header(config: pytest.Config) -> str:
    import torch
    import triton

    from .device import device_name, is_interpreter

    mode = "Triton interpreter on CPU" if is_interpreter() else "compiled kernels"
    return f"triton-ops: {mode}; device {device_name()}; torch {torch.__version__}; triton {triton.__version__}"
