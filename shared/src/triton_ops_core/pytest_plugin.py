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
- ``--param-shard K/N`` (or ``TRITON_OPS_PARAM_SHARD``) runs, of each parametrized test function, its first case
  and the cases whose name hashes to ``K`` modulo ``N``: sessions given the shards ``0/N`` .. ``N-1/N`` run every
  case at least once between them and every test function in each. CI's two triton versions take one half each
  of the kernel packages' cases; tests marked ``every_param`` always run whole.
- Under the interpreter, shortcuts for work Triton's interpreter repeats for nothing (``install_interpreter_shortcuts``,
  also for processes tests spawn; ``TRITON_OPS_INTERPRETER_AS_IS=1`` leaves it as shipped; docs/development.md).
"""

from __future__ import annotations

import os
from pathlib import Path


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

import zlib  # noqa: E402
from collections.abc import Iterable  # noqa: E402

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


# Triton's interpreter re-patches triton.language on every call of a @triton.jit helper from inside a kernel
# (InterpretedFunction.__call__ runs _patch_lang: inspect.getmembers over tl, tl.math and tl.tensor, each builtin
# wrapped anew), although the kernel launch around it (GridExecutor.__call__) has patched the same modules already
# and undoes it only when the launch ends. For kernels built from helpers that was a third of the test time (a
# Gemma 3 sliding-window test: 5.8 of 19.3 s). The helper's repatching is skipped where every language module the
# helper's globals hold is patched already: by the launch in progress, or by an earlier helper call (whose patching
# Triton never undoes); any other call runs as Triton wrote it. Applied only where Triton's helper call is the body
# below (triton 3.6 to 3.9), checked against its source.
_UPSTREAM_DEVICE_CALL = (
    "def __call__(self, *args, **kwargs):",
    "# This is a device function call",
    "_patch_lang(self.fn)",
    "fn = self.rewrite()",
    "try:",
    "return fn(*args, **kwargs)",
    "except Exception as e:",
    "raise InterpreterError(repr(e)) from e",
)


def _skip_repatching_in_device_calls() -> bool:
    """Install the interpreter shortcut above; False (nothing changed) where this Triton's code is not the one
    it was written for."""
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    device_call = vars(getattr(interpreter, "InterpretedFunction", object)).get("__call__")
    if getattr(device_call, "_triton_ops_skip_repatch", False):
        return True
    try:
        source = tuple(line.strip() for line in inspect.getsource(device_call).splitlines() if line.strip())
    except (OSError, TypeError):
        return False
    if source != _UPSTREAM_DEVICE_CALL or not all(
            hasattr(interpreter, n) for n in ("GridExecutor", "InterpreterError", "_patch_lang", "tl")):
        return False
    tl = interpreter.tl
    langs_of: dict[object, frozenset[int]] = {}
    in_launch: list[frozenset[int]] = []  # the language modules each launch in progress patched
    # Modules a helper call patched: Triton never undoes a helper call's patching (its scope is dropped), so their
    # builtins stay patched for the rest of the process (triton.language.standard's sum / max / zeros, whose globals
    # hold triton.language.core, patch core on their first call inside a kernel that sees only triton.language).
    helper_patched: set[int] = set()

    def langs(fn) -> frozenset[int]:  # the modules _patch_lang patches for fn
        found = langs_of.get(fn)
        if found is None:
            found = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return found

    launch = interpreter.GridExecutor.__call__

    def grid_call(self, *args, **kwargs):
        in_launch.append(langs(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            in_launch.pop()

    def helper_call(self, *args, **kwargs):
        needed = langs(self.fn)
        if not (in_launch and needed <= in_launch[-1] | helper_patched):
            interpreter._patch_lang(self.fn)
            helper_patched.update(needed)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    helper_call._triton_ops_skip_repatch = True
    interpreter.GridExecutor.__call__ = grid_call
    interpreter.InterpretedFunction.__call__ = helper_call
    return True


# The interpreter asks for the numpy dtype of a Triton type on every operation (``_get_np_dtype``), and Triton builds
# its 18-entry table anew on each call: 3.4 s of a 44 s model test (test_patch_model's FP8 input norm, session 42).
# The table is read once from Triton's own function; the lookup replaces it only where it answers as Triton's does
# for every scalar, block and pointer type (triton 3.6 and 3.9 write the same function).
def _np_dtype_lookup() -> bool:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_get_np_dtype", None)
    tl = getattr(interpreter, "tl", None)
    if original is None or tl is None or getattr(original, "_triton_ops_table", False):
        return original is not None
    try:
        scalars = [v for v in vars(tl).values() if isinstance(v, tl.dtype) and not isinstance(v, tl.pointer_type)]
        table = {}
        for d in scalars:
            try:
                table[d] = original(d)
            except KeyError:  # a type the interpreter has no numpy form for: it keeps raising
                pass
        pointer = original(tl.pointer_type(tl.float32))

        def lookup(tt_dtype):
            if isinstance(tt_dtype, tl.pointer_type):
                return pointer
            if isinstance(tt_dtype, tl.block_type):
                element = tt_dtype.element_ty
                return pointer if isinstance(element, tl.pointer_type) else table[element]
            return table[tt_dtype]

        samples = [*table, tl.pointer_type(tl.int8), tl.block_type(tl.pointer_type(tl.bfloat16), [4]),
                   *(tl.block_type(d, [2, 8]) for d in table)]
        if any(lookup(t) != original(t) for t in samples):
            return False
    except Exception:  # another Triton: its own function stays
        return False
    lookup._triton_ops_table = True
    interpreter._get_np_dtype = lookup
    return True


# triton 3.6 names every tuple type as it builds it (a string of all its types' names), and the interpreter builds
# one for each tensor's shape: 4.0 s of that 44 s test. triton 3.9 names it when asked (a cached property); the same
# is done here where 3.6's constructor is the one below, checked against its source.
_UPSTREAM_TUPLE_TYPE_INIT = (
    "def __init__(self, types, fields=None):",
    "self.types = types",
    "self.fields = fields or [''] * len(types)",
    "self.name = '[' + ','.join([f\"{k}:{v}\" for k, v in zip(self.fields, self.types)]) + ']'",
)


def _tuple_type_named_when_asked() -> bool:
    import functools
    import inspect

    try:
        from triton.language import core
    except ImportError:
        return False
    cls = getattr(core, "tuple_type", None)
    init = vars(cls).get("__init__") if cls is not None else None
    if init is None or getattr(init, "_triton_ops_lazy_name", False):
        return init is not None
    try:
        source = tuple(line.strip() for line in inspect.getsource(init).splitlines() if line.strip())
    except (OSError, TypeError):
        return False
    if source != _UPSTREAM_TUPLE_TYPE_INIT or "name" in vars(cls):
        return False

    def __init__(self, types, fields=None):
        self.types = types
        self.fields = fields or [''] * len(types)

    def name(self):
        return '[' + ','.join([f"{k}:{v}" for k, v in zip(self.fields, self.types)]) + ']'

    __init__._triton_ops_lazy_name = True
    cls.__init__ = __init__
    lazy = functools.cached_property(name)
    lazy.__set_name__(cls, "name")
    cls.name = lazy
    return True


def install_interpreter_shortcuts() -> None:
    """The interpreter shortcuts above, each where the installed Triton's code is the one it was written for; none
    with ``TRITON_OPS_INTERPRETER_AS_IS=1``. For processes that tests start themselves (the pytest session installs
    them under the interpreter)."""
    if os.environ.get("TRITON_OPS_INTERPRETER_AS_IS", "0") == "1":  # 1: Triton's interpreter untouched
        return
    _skip_repatching_in_device_calls()
    _np_dtype_lookup()
    _tuple_type_named_when_asked()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a compiled kernel on a CUDA GPU (skipped under the interpreter)")
    config.addinivalue_line("markers", "slow: long-running even on a GPU")
    config.addinivalue_line(
        "markers", "every_param: every parametrized case runs in each session, whatever --param-shard says")
    config.addinivalue_line(
        "markers", "newest_only: in CI's test matrix, run only beside the newest triton and transformers (benchmark "
                   "harnesses, a second multi-process run): the oldest pair's sessions deselect it")
    if os.environ.get("TRITON_INTERPRET") == "1":
        for spec in INTERPRETER_WARNINGS:
            config.addinivalue_line("filterwarnings", spec)
        install_interpreter_shortcuts()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--param-shard", default=os.environ.get("TRITON_OPS_PARAM_SHARD") or None, metavar="K/N",
        help="of each parametrized test function, run the first case and the cases whose name hashes to K modulo N "
             "(the shards 0/N .. N-1/N together run every case); tests marked every_param run whole "
             "(default: $TRITON_OPS_PARAM_SHARD, else every case)")


def parse_param_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; a ``pytest.UsageError`` naming the option otherwise."""
    try:
        k, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--param-shard takes K/N (e.g. 0/2), got {spec!r}") from None
    if not 0 <= k < n:
        raise pytest.UsageError(f"--param-shard {spec}: K must be in 0..N-1 and N at least 1")
    return k, n


def param_case_in_shard(key: str, shard: int, shards: int) -> bool:
    """Whether the case named ``key`` belongs to ``shard`` of ``shards``: a hash of the name, the same in every
    process, session and machine (xdist's workers must collect the same tests)."""
    return zlib.crc32(key.encode()) % shards == shard


def select_param_shard(items: Iterable[pytest.Item], shard: int, shards: int) -> tuple[list, list]:
    """Split ``items`` into (kept, deselected) for ``--param-shard``: a test function's first parametrized case
    always stays (every function runs in every shard), its other cases stay in the shard their name hashes to;
    unparametrized tests and tests marked ``every_param`` stay whole. The key is the module's file name and the
    test's name, so a case keeps its shard whichever folder or root pytest was started from."""
    kept, deselected, seen = [], [], set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        function = (str(item.path), getattr(getattr(item, "cls", None), "__name__", ""),
                    getattr(item, "originalname", item.name))
        first = function not in seen
        seen.add(function)
        if (callspec is None or first or item.get_closest_marker("every_param") is not None
                or param_case_in_shard(f"{Path(item.path).name}::{item.name}", shard, shards)):
            kept.append(item)
        else:
            deselected.append(item)
    return kept, deselected


@pytest.hookimpl(trylast=True)  # after conftests have marked what must run whole
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _skip_gpu_tests_without_a_gpu(items)
    spec = config.getoption("--param-shard", default=None)
    if spec:
        shard, shards = parse_param_shard(spec)
        kept, deselected = select_param_shard(items, shard, shards)
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept


def _skip_gpu_tests_without_a_gpu(items: list[pytest.Item]) -> None:
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
    spec = config.getoption("--param-shard", default=None)
    shard = f"; parametrized cases: shard {spec} (and each function's first)" if spec else ""
    return (f"triton-ops: {mode}; device {device_name()}; torch {torch.__version__}; triton {triton.__version__}"
            f"{shard}")
