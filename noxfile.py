"""nox sessions for the triton-ops monorepo.

    nox -s tests-3.11          every package's tests, each in its own venv, across the triton matrix
    nox -s lint                ruff
    nox -s build               wheels + sdists of all six distributions, each installed alone and imported
    nox -s release-check -- fp8-gemm-v0.2.0
    nox -s bench               the benchmark suite (full sweep on a GPU; interpreter correctness run without)

Without a GPU, tests run kernels under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors. torch 2.13.0's CPU
build is the torch of every CPU session: it declares no triton dependency, so any triton can be paired with it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = False

PYTHONS = ["3.11", "3.12"]
TORCH = "torch==2.13.0"
# The oldest triton we support (what torch 2.10/2.11 ship, and what the lent H100 runs) and the newest.
TRITONS = ["3.6.0", "3.9.0"]

# distribution -> (folder, import name, sibling distributions it depends on)
PACKAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "triton-ops-core": ("shared", "triton_ops_core", ()),
    "kernel-autotune": ("packages/kernel-autotune", "kernel_autotune", ("triton-ops-core",)),
    "fused-rmsnorm-rope": ("packages/fused-rmsnorm-rope", "fused_rmsnorm_rope", ("triton-ops-core", "kernel-autotune")),
    "fused-gated-mlp": ("packages/fused-gated-mlp", "fused_gated_mlp", ("triton-ops-core", "kernel-autotune")),
    "fp8-gemm": ("packages/fp8-gemm", "fp8_gemm", ("triton-ops-core", "kernel-autotune")),
    "triton-ops": (
        "packages/triton-ops",
        "triton_ops",
        ("triton-ops-core", "kernel-autotune", "fused-rmsnorm-rope", "fused-gated-mlp", "fp8-gemm"),
    ),
}
SHORT = {"triton-ops-core": "core", "kernel-autotune": "autotune", "fused-rmsnorm-rope": "rmsnorm-rope",
         "fused-gated-mlp": "gated-mlp", "fp8-gemm": "fp8-gemm", "triton-ops": "umbrella"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _base_requirements(triton: str) -> list[str]:
    reqs = [TORCH, f"triton=={triton}", "pytest>=8", "hypothesis>=6.100"]
    if _version_tuple(triton) < (3, 7):
        reqs.append("numpy<2.4")  # triton < 3.7's interpreter breaks on numpy 2.4 (triton issue 9171)
    return reqs


def _local_folders(dist: str) -> list[str]:
    """The package and its sibling dependencies as local folders, so pip resolves the names here, not on PyPI."""
    folder, _, deps = PACKAGES[dist]
    return [str(ROOT / PACKAGES[d][0]) for d in deps] + [str(ROOT / folder)]


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None and os.environ.get("TRITON_INTERPRET", "0") != "1"


@nox.session(python=PYTHONS)
@nox.parametrize(
    "triton,dist",
    [nox.param(t, d, id=f"triton{t.replace('.', '')[:2]}-{SHORT[d]}") for t in TRITONS for d in PACKAGES],
)
def tests(session: nox.Session, triton: str, dist: str) -> None:
    """One distribution's tests in a venv holding only it and its real dependencies."""
    session.install(*_base_requirements(triton))
    # Non-editable installs: the tests import what a user would get, so a missing dependency or file fails here.
    session.install(*_local_folders(dist))
    env = {} if _gpu_present() else {"TRITON_INTERPRET": "1"}
    folder = PACKAGES[dist][0]
    session.run("python", "-c", "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)")
    session.run("pytest", "-q", "-p", "no:cacheprovider", f"{folder}/tests", *session.posargs, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "shared", "packages", "benchmarks", "noxfile.py")


def _check_installs_alone(session: nox.Session, dist: str, wheel_dir: Path) -> None:
    """Install one wheel into an empty venv with its dependencies (siblings from the built wheels) and import it."""
    _, import_name, _ = PACKAGES[dist]
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        session.run("python", "-m", "venv", str(venv), silent=True)
        py = str(venv / "bin" / "python")
        # torch first and pinned to the CPU build on disk: an unpinned torch would pull a multi-GB CUDA build.
        session.run(py, "-m", "pip", "install", "-q", TORCH, external=True, silent=True)
        session.run(py, "-m", "pip", "install", "-q", "--find-links", str(wheel_dir), dist, external=True, silent=True)
        session.run(py, "-c", f"import {import_name}; print('{dist}', {import_name}.__version__, 'imports alone')",
                    external=True, env={"TRITON_INTERPRET": "1"})


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Build every wheel and sdist with hatch; install each alone into an empty venv and import it."""
    session.install("hatch>=1.12")
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    for dist in PACKAGES:
        session.chdir(ROOT / PACKAGES[dist][0])
        session.run("hatch", "build", str(dist_dir), silent=True)
    session.chdir(ROOT)
    wheels = sorted(dist_dir.glob("*.whl"))
    session.log(f"built {len(wheels)} wheels and {len(list(dist_dir.glob('*.tar.gz')))} sdists in {dist_dir}")
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, got {[w.name for w in wheels]}")
    for dist in PACKAGES:
        _check_installs_alone(session, dist, dist_dir)


def _read_version(dist: str) -> str:
    folder, import_name, _ = PACKAGES[dist]
    text = (ROOT / folder / "src" / import_name / "__about__.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not match:
        raise RuntimeError(f"no __version__ in {folder}/src/{import_name}/__about__.py")
    return match.group(1)


@nox.session(name="release-check", python="3.11")
def release_check(session: nox.Session) -> None:
    """Given a tag like ``fp8-gemm-v0.2.0``: the package's version must match; build only it."""
    if not session.posargs:
        session.error("usage: nox -s release-check -- <distribution>-v<version>  (e.g. fp8-gemm-v0.1.0)")
    tag = session.posargs[0]
    match = re.fullmatch(r"(?P<dist>[a-z0-9-]+?)-v(?P<version>\d+\.\d+\.\d+(?:[a-z0-9.+-]*)?)", tag)
    if not match or match["dist"] not in PACKAGES:
        session.error(f"tag {tag!r}: expected <distribution>-v<version> with distribution in {sorted(PACKAGES)}")
    dist, version = match["dist"], match["version"]
    found = _read_version(dist)
    if found != version:
        session.error(f"tag {tag} says {version} but {dist}'s __about__.py says {found}")
    session.install("hatch>=1.12")
    out = ROOT / "dist" / "release" / dist
    shutil.rmtree(out, ignore_errors=True)
    session.chdir(ROOT / PACKAGES[dist][0])
    session.run("hatch", "build", str(out), silent=True)
    built = sorted(p.name for p in out.iterdir())
    expected_prefix = dist.replace("-", "_") + "-" + version
    if not built or not all(name.startswith(expected_prefix) for name in built):
        session.error(f"built {built}, expected only {expected_prefix} artifacts")
    session.log(f"release-check ok: {built}")


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """The benchmark suite: the full sweep with a GPU; without one, every kernel on small shapes under the interpreter."""
    session.install(*_base_requirements(TRITONS[0]), "matplotlib>=3.7", "tqdm>=4.60")
    session.install(*_local_folders("triton-ops"))
    env = {} if _gpu_present() else {"TRITON_INTERPRET": "1"}
    session.run("python", "-m", "benchmarks", *session.posargs, env=env)
