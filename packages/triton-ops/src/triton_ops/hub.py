"""triton-ops' layers as a local Hugging Face ``kernels`` repository.

transformers 5.x tags its layers for Hugging Face's ``kernels`` library (``@use_kernel_forward_from_hub("RMSNorm")``
on ``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``MistralRMSNorm``, ...), and ``kernels.kernelize`` replaces the ``forward`` of
every tagged module with the one of a layer class found in a kernel repository. This module writes such a repository
for triton-ops (:func:`write_kernel_repository`, or ``python -m triton_ops.hub PATH``) and builds the two mappings
that point at it: the ``kernels`` one (:func:`kernel_mapping`, for ``use_kernel_mapping`` + ``kernelize``) and the
transformers one (:func:`kernel_config`, for ``model.set_use_kernels(True, kernel_config)``).

The repository holds no kernel code of its own: each build variant's ``__init__.py`` imports the installed
``triton_ops`` and exposes :mod:`triton_ops.layers` as its ``layers``. It therefore works only beside an installed
triton-ops (it cannot be uploaded to the Hub as a self-contained kernel), and it follows that installation when
triton-ops is upgraded (a version mismatch is warned about when it is loaded).

Layout (``kernels`` 0.17 reads metadata.json, then the package folder; ``kernels`` 0.10 reads the package folder)::

    PATH/README.md
    PATH/build/torch-cuda/metadata.json          one noarch variant per backend: Triton compiles at run time
    PATH/build/torch-cuda/triton_ops/__init__.py
    PATH/build/torch-cpu/...                     only when asked for: CPU tensors run only under TRITON_INTERPRET=1

``kernels`` picks the variant from the backend torch was built for (a CUDA build of torch loads ``torch-cuda``, a CPU
build ``torch-cpu``), whatever device ``kernelize`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from triton_ops_core.exceptions import InvalidArgumentError

from .__about__ import __version__

# The kernel's name in metadata.json (kernels checks it against ^[a-z][-a-z0-9]*[a-z0-9]$) and the package folder of
# each variant (kernels' python_name of that name; transformers 5.0's local route also takes the repository folder's
# name as the package name, so name the folder ``triton_ops`` there).
KERNEL_NAME = "triton-ops"
PACKAGE = "triton_ops"

# transformers' hub layer name -> our layer class in triton_ops.layers. "RMSNorm" is what transformers tags
# (LlamaRMSNorm, Qwen3RMSNorm, MistralRMSNorm, Qwen2RMSNorm and most other decoders' norms); "RMSNormZeroCentered"
# its norms that scale by 1 + weight (Qwen3.5's: weight, eps), GemmaRMSNorm's computation. transformers tags no
# gated MLP: "GatedMLP" is ours, for a module class tagged by hand with kernels.replace_kernel_forward_from_hub.
LAYERS = {"RMSNorm": "RMSNorm", "RMSNormZeroCentered": "GemmaRMSNorm", "GatedMLP": "GatedMLP"}
DEFAULT_LAYERS = ("RMSNorm", "RMSNormZeroCentered")
# transformers' KernelConfig refuses a layer name that no module of the model is tagged with: its default is "RMSNorm"
# alone (pass layers=("RMSNorm", "RMSNormZeroCentered") for a Qwen3.5 model)
DEFAULT_CONFIG_LAYERS = ("RMSNorm",)

# Backends a variant can be written for: Triton's NVIDIA target, and the CPU under Triton's interpreter (tests).
BACKENDS = ("cuda", "cpu")

_INIT = '''"""triton-ops {version} as a Hugging Face `kernels` repository (triton_ops.hub.write_kernel_repository).

This folder holds no kernel code: `layers` is the installed triton-ops package's `triton_ops.layers`."""

import warnings

import triton_ops
from triton_ops import layers

if triton_ops.__version__ != "{version}":
    warnings.warn(
        f"this kernel repository was written by triton-ops {version}; the installed triton-ops is "
        f"{{triton_ops.__version__}} (its layers are used); rewrite it: `python -m triton_ops.hub PATH --overwrite`",
        stacklevel=2,
    )

__all__ = ["layers"]
'''

_README = """# triton-ops as a local Hugging Face `kernels` repository

Written by `triton_ops.hub.write_kernel_repository` (triton-ops {version}); variants: {variants}.
Its layers (`{layers}`) are the installed triton-ops package's `triton_ops.layers`: this folder holds no kernel code
and works only beside that installation. See triton-ops' docs/kernels-hub.md.
"""


def _metadata(backend: str) -> dict[str, Any]:
    return {
        "id": f"_{PACKAGE}_{__version__.replace('.', '_')}_{backend}",  # the module name kernels imports it under
        "name": KERNEL_NAME,
        "version": 1,
        "license": "MIT",
        "python-depends": [],  # kernels accepts only its own list of names here; triton-ops is required all the same
        "backend": {"type": backend},  # no "archs": Triton compiles for the device at run time
    }


def write_kernel_repository(path: str | Path, *, backends: Sequence[str] = ("cuda",),
                            overwrite: bool = False) -> Path:
    """Write a local ``kernels`` repository of triton-ops' layers at ``path``; returns its absolute path.

    ``backends``: the noarch build variants to write, from :data:`BACKENDS`. ``"cuda"`` (the default) is what a CUDA
    build of torch loads; ``"cpu"`` is what a CPU build of torch loads, and its layers run only under Triton's
    interpreter (``TRITON_INTERPRET=1``), which makes it a test tool. ``overwrite=True`` replaces an existing
    repository written here before (any other non-empty folder is refused).

    Raises:
        InvalidArgumentError: an unknown or empty ``backends``, or ``path`` is a file or a non-empty folder that is
            not to be overwritten.
    """
    backends = tuple(dict.fromkeys(backends))
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise InvalidArgumentError(
            f"backends: expected one or more of {', '.join(map(repr, BACKENDS))}, got {list(backends)!r}")
    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"path: expected a folder for the kernel repository, got the file {str(root)!r}")
    if root.is_dir() and any(root.iterdir()):
        ours = (root / "build").is_dir() and (root / "README.md").is_file()
        if not overwrite or not ours:
            why = "pass overwrite=True to replace it" if ours else "it is not a repository written by triton-ops"
            raise InvalidArgumentError(f"path: {str(root)!r} is not empty ({why})")
        shutil.rmtree(root / "build")
    for backend in backends:
        variant = root / "build" / f"torch-{backend}"
        (variant / PACKAGE).mkdir(parents=True, exist_ok=True)
        (variant / "metadata.json").write_text(json.dumps(_metadata(backend), indent=2) + "\n")
        (variant / PACKAGE / "__init__.py").write_text(_INIT.format(version=__version__))
    (root / "README.md").write_text(_README.format(
        version=__version__, variants=", ".join(f"torch-{b}" for b in backends), layers="`, `".join(LAYERS)))
    return root


def _check_layers(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in LAYERS]
    if not names or unknown:
        raise InvalidArgumentError(
            f"layers: expected one or more of {', '.join(map(repr, LAYERS))}, got {list(names)!r}")
    return names


def _local_repository(repo_path: Path, layer_name: str) -> Any:
    import inspect

    from kernels import LocalLayerRepository

    # kernels 0.10 (what transformers 5.0 asks for) also wants the package folder's name
    if "package_name" in inspect.signature(LocalLayerRepository).parameters:
        return LocalLayerRepository(repo_path=repo_path, package_name=PACKAGE, layer_name=layer_name)
    return LocalLayerRepository(repo_path=repo_path, layer_name=layer_name)


def kernel_mapping(repo_path: str | Path, *, devices: Sequence[str] = ("cuda",),
                   layers: Sequence[str] = DEFAULT_LAYERS) -> dict[str, dict[str, Any]]:
    """The ``kernels`` layer mapping that points transformers' layer names at the repository at ``repo_path``.

    ``{"RMSNorm": {"cuda": LocalLayerRepository(repo_path, layer_name="RMSNorm")}}`` for the defaults; pass it to
    ``kernels.use_kernel_mapping`` (or ``register_kernel_mapping``), then call ``kernels.kernelize(model, mode=...,
    device=...)``. ``devices``: the ``kernelize`` device types to map (``"cpu"`` for CPU tensors under the
    interpreter; the repository's variant is chosen by torch's build, not by this). ``layers``: names from
    :data:`LAYERS`. Each repository is registered for every mode (kernels' ``Mode.FALLBACK``): the layers say
    themselves that they support ``torch.compile`` and backward. Needs the ``kernels`` package.
    """
    root = Path(repo_path).expanduser().resolve()
    names = _check_layers(layers)
    return {hub_name: {device: _local_repository(root, LAYERS[hub_name]) for device in devices} for hub_name in names}


def kernel_config(repo_path: str | Path, *, device: str = "cuda",
                  layers: Sequence[str] = DEFAULT_CONFIG_LAYERS) -> Any:
    """transformers' ``KernelConfig`` that swaps triton-ops' layers in from the local repository at ``repo_path``.

    ``model.set_use_kernels(True, kernel_config(path))`` on a loaded model. (``from_pretrained(..., use_kernels=True,
    kernel_config=...)`` takes it too, but transformers 5.18 to 5.22 then fail inside ``from_pretrained`` on any local
    mapping: ``'tuple' object has no attribute 'split'``.) transformers accepts one device per layer here and never
    ``"cpu"`` (its list of kernel devices has none), so the mapping names ``device``: on a model placed elsewhere it
    maps nothing. It only acts when transformers supports the installed ``kernels`` release
    (``transformers.utils.import_utils.is_kernels_available()``); otherwise transformers' decorators are no-ops.
    """
    from transformers import KernelConfig

    root = Path(repo_path).expanduser().resolve()
    mapping = {hub_name: {device: f"{root}:{LAYERS[hub_name]}"} for hub_name in _check_layers(layers)}
    return KernelConfig(kernel_mapping=mapping, use_local_kernel=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m triton_ops.hub PATH [--backend cuda] [--backend cpu] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m triton_ops.hub",
        description="Write triton-ops' layers as a local Hugging Face `kernels` repository.")
    parser.add_argument("path", help="the repository's folder (created; name it triton_ops for transformers 5.0)")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="a build variant to write (repeatable; default: cuda)")
    parser.add_argument("--overwrite", action="store_true", help="replace a repository written there before")
    args = parser.parse_args(argv)
    try:
        root = write_kernel_repository(args.path, backends=args.backend or ("cuda",), overwrite=args.overwrite)
    except InvalidArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(root)
    return 0


__all__ = ["BACKENDS", "DEFAULT_CONFIG_LAYERS", "DEFAULT_LAYERS", "KERNEL_NAME", "LAYERS", "kernel_config",
           "kernel_mapping", "main", "write_kernel_repository"]

if __name__ == "__main__":
    raise SystemExit(main())
