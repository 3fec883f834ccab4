"""The registry of tunable kernel families, so the ``tune`` command can find kernels it does not import.

A kernel package makes itself tunable in one of two ways, neither of which makes kernel-autotune import it
before it is needed:

- an entry point in its ``pyproject.toml``::

      [project.entry-points."kernel_autotune.tunables"]
      my_kernels = "my_kernels.tuning:tunable"     # a zero-argument callable returning a Tunable

- or a call at import time of one of its modules (then pass ``--module my_kernels.tuning`` to the CLI)::

      register_tunable("my_kernels", tunable)

kernel-autotune knows no kernel family of its own: the triton-ops kernel packages (``fused_rmsnorm_rope``,
``fused_gated_mlp``, ``fp8_gemm``) declare theirs through the entry point, each in its ``tuning`` module.

A distribution run from source (its ``src`` folder on ``PYTHONPATH``, nothing installed, as on the GPU machine) has
no installed metadata; its entry points are then read from the ``pyproject.toml`` beside that ``src`` folder, so
``tune --all`` finds the same families either way.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from triton_ops_core.exceptions import InvalidArgumentError

ENTRY_POINT_GROUP = "kernel_autotune.tunables"

Shape = Mapping[str, Any]


@dataclass
class Tunable:
    """A kernel family the ``tune`` command can tune.

    ``prepare(shape, device)`` allocates random inputs of one benchmark shape and returns a zero-argument
    callable running the family's public operation once on them; the operation must take its launch
    configs from ``select_config`` with a ``space``. ``shapes`` are the benchmark shapes ``tune --all``
    uses. ``reset`` clears the package's own memo of configs, if it keeps one. ``shipped`` is the path of
    the package's ``tuned_configs.json``; ``prefixes`` are the kernel-name prefixes that belong to the
    family (default: its name), used to export its entries.
    """

    name: str
    prepare: Callable[[Shape, torch.device], Callable[[], Any]]
    shapes: Sequence[Shape] = ()
    reset: Callable[[], None] | None = None
    shipped: Path | None = None
    prefixes: tuple[str, ...] = ()
    describe: Callable[[Shape], str] | None = None
    requires_gpu_feature: Callable[[torch.device], str | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prefixes:
            self.prefixes = (self.name,)

    def label(self, shape: Shape) -> str:
        """A short text naming ``shape`` in tables."""
        if self.describe is not None:
            try:
                return self.describe(shape)
            except (KeyError, TypeError, ValueError):  # a hand-written --shape missing a field: plain text
                pass
        return ",".join(f"{k}={v}" for k, v in shape.items())

    def owns(self, kernel: str) -> bool:
        """Whether a cache entry of ``kernel`` belongs to this family."""
        return any(kernel == p or kernel.startswith(p + ".") for p in self.prefixes)


TunableFactory = Callable[[], Tunable]

_registered: dict[str, TunableFactory] = {}


def register_tunable(name: str, factory: TunableFactory | Tunable) -> None:
    """Register a kernel family under ``name``: ``factory`` is a zero-argument callable returning a
    :class:`Tunable` (called only when the family is tuned), or a ``Tunable`` itself. A later
    registration of the same name replaces the earlier one."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name: expected a non-empty string, got {name!r}")
    if isinstance(factory, Tunable):
        tunable = factory
        factory = lambda: tunable  # noqa: E731
    if not callable(factory):
        raise InvalidArgumentError(f"factory: expected a zero-argument callable returning a Tunable, got {factory!r}")
    _registered[name] = factory


def unregister_tunable(name: str) -> None:
    """Remove a family registered with :func:`register_tunable` (entry points stay)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python < 3.10 signature
        eps = entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


_SECTION = re.compile(r'^\[project\.entry-points\.(?:"kernel_autotune\.tunables"|kernel_autotune\.tunables)\]\s*$')
_ASSIGN = re.compile(r'^\s*"?([A-Za-z0-9_.-]+)"?\s*=\s*"([A-Za-z0-9_.]+:[A-Za-z0-9_.]+)"\s*(?:#.*)?$')


def _pyproject_entry_points(text: str) -> dict[str, str]:
    """name -> ``"module:attr"`` of the ``kernel_autotune.tunables`` group in a ``pyproject.toml``'s text."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the section's plain ``name = "module:attr"`` lines
        out: dict[str, str] = {}
        inside = False
        for line in text.splitlines():
            if line.strip().startswith("["):
                inside = bool(_SECTION.match(line.strip()))
                continue
            m = _ASSIGN.match(line) if inside else None
            if m:
                out[m.group(1)] = m.group(2)
        return out
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}
    group = doc.get("project", {}).get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return {str(k): str(v) for k, v in group.items() if isinstance(v, str)}


def _source_entry_points() -> dict[str, str]:
    """Families of distributions run from source: every ``sys.path`` folder named ``src`` whose parent holds a
    ``pyproject.toml`` declaring the group."""
    out: dict[str, str] = {}
    for entry in sys.path:
        folder = Path(entry or ".")
        if folder.name != "src":
            continue
        try:
            text = (folder.parent / "pyproject.toml").read_text(encoding="utf-8")
        except OSError:
            continue
        for name, target in _pyproject_entry_points(text).items():
            out.setdefault(name, target)
    return out


def _load_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def available_tunables() -> dict[str, str]:
    """Every known family and where it comes from: ``"registered"``, ``"entry point"`` or ``"source"`` (a
    ``pyproject.toml`` beside a ``src`` folder on ``sys.path``)."""
    out: dict[str, str] = {}
    for name in _source_entry_points():
        out[name] = "source"
    for name in _entry_points():
        out[name] = "entry point"
    for name in _registered:
        out[name] = "registered"
    return dict(sorted(out.items()))


def get_tunable(name: str) -> Tunable:
    """The family ``name``: a registered one first, then an installed entry point, then one read from source."""
    factory: Callable[[], Any] | None = _registered.get(name)
    if factory is None:
        ep = _entry_points().get(name)
        if ep is not None:
            factory = ep.load()
    if factory is None:
        target = _source_entry_points().get(name)
        if target is not None:
            factory = _load_target(target)
    if factory is None:
        known = ", ".join(available_tunables()) or "none"
        raise InvalidArgumentError(
            f"kernel family {name!r} is not registered (known: {known}); a package run from source, without "
            f"installed metadata, registers its family with --module <package>.tuning")
    tunable = factory() if not isinstance(factory, Tunable) else factory
    if not isinstance(tunable, Tunable):
        raise InvalidArgumentError(
            f"kernel family {name!r}: its factory returned {type(tunable).__name__}, not a Tunable")
    return tunable


def import_modules(modules: Sequence[str]) -> None:
    """Import modules that register families at import time (the CLI's ``--module``)."""
    for mod in modules:
        importlib.import_module(mod)


__all__ = [
    "ENTRY_POINT_GROUP",
    "Tunable",
    "TunableFactory",
    "available_tunables",
    "get_tunable",
    "import_modules",
    "register_tunable",
    "unregister_tunable",
]
