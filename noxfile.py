"""nox sessions for the triton-ops monorepo.

    nox -s tests-3.11          every package's tests, each in its own venv, across the triton matrix
    nox -s lint                ruff
    nox -s build               wheels + sdists of all eight distributions, each installed alone and imported
    nox -s release-check -- fp8-gemm-v0.2.0
    nox -s bench               the benchmark suite (full sweep on a GPU; interpreter correctness run without)
    nox -s quickstart          docs/quickstart.md's install command, as written, in a clean venv, then an example
    nox -s models -- 5.17.0    the model integration's tests against one transformers release (e.g. the GPU's)

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
# uv makes the 9 test environments cheap (seconds each instead of a minute); plain venv+pip where uv is missing.
nox.options.default_venv_backend = "uv|virtualenv"

PYTHONS = ["3.11", "3.12"]
# torch 2.13.0's CPU build. Machines of this project keep its wheel in /opt/wheels; elsewhere it comes from the
# PyTorch CPU index. Never an unpinned torch: that would pull a multi-gigabyte CUDA build.
LOCAL_WHEELS = Path("/opt/wheels")
if any(LOCAL_WHEELS.glob("torch-2.13.0+cpu-*.whl")):
    TORCH = "torch==2.13.0+cpu"
    os.environ.setdefault("UV_FIND_LINKS", str(LOCAL_WHEELS))
else:
    TORCH = "torch==2.13.0"
    os.environ.setdefault("UV_INDEX", "https://download.pytorch.org/whl/cpu")
    os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")
    os.environ.setdefault("PIP_EXTRA_INDEX_URL", "https://download.pytorch.org/whl/cpu")
# The oldest triton we support (what torch 2.10/2.11 ship, and what the lent H100 runs) and the newest.
TRITONS = ["3.6.0", "3.9.0"]
# The umbrella's model integration (patch_model) is tested against the oldest transformers we support, beside the
# oldest triton, and the newest, beside the newest: transformers changes its module code between releases.
TRANSFORMERS = {"3.6.0": "transformers==5.0.0", "3.9.0": "transformers"}
# Hugging Face's `kernels` beside the newest transformers only (the route of docs/kernels-hub.md): transformers 5.0
# fails to import its models with kernels 0.17 installed, and kernels 0.10 (what 5.0 asks for) loads no local kernel
# on a CPU-only torch.
KERNELS = {"3.9.0": ["kernels>=0.17"]}

# distribution -> (folder, import name, sibling distributions it depends on)
PACKAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "triton-ops-core": ("shared", "triton_ops_core", ()),
    "kernel-autotune": ("packages/kernel-autotune", "kernel_autotune", ("triton-ops-core",)),
    "fused-rmsnorm-rope": ("packages/fused-rmsnorm-rope", "fused_rmsnorm_rope", ("triton-ops-core", "kernel-autotune")),
    "fused-gated-mlp": ("packages/fused-gated-mlp", "fused_gated_mlp", ("triton-ops-core", "kernel-autotune")),
    "fp8-gemm": ("packages/fp8-gemm", "fp8_gemm", ("triton-ops-core", "kernel-autotune")),
    "fused-moe": ("packages/fused-moe", "fused_moe", ("triton-ops-core",)),
    "decode-attention": ("packages/decode-attention", "decode_attention", ("triton-ops-core",)),
    "triton-ops": (
        "packages/triton-ops",
        "triton_ops",
        ("triton-ops-core", "kernel-autotune", "fused-rmsnorm-rope", "fused-gated-mlp", "fp8-gemm", "fused-moe",
         "decode-attention"),
    ),
}
SHORT = {"triton-ops-core": "core", "kernel-autotune": "autotune", "fused-rmsnorm-rope": "rmsnorm-rope",
         "fused-gated-mlp": "gated-mlp", "fp8-gemm": "fp8-gemm", "fused-moe": "moe", "decode-attention": "attention",
         "triton-ops": "umbrella"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _base_requirements(triton: str) -> list[str]:
    reqs = [TORCH, f"triton=={triton}", "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"]
    # triton < 3.7's interpreter breaks on numpy 2.4 (triton issue 9171)
    reqs.append("numpy<2.4" if _version_tuple(triton) < (3, 7) else "numpy")
    return reqs


def _local_folders(dist: str) -> list[str]:
    """The package and its sibling dependencies as local folders, so pip resolves the names here, not on PyPI."""
    folder, _, deps = PACKAGES[dist]
    return [str(ROOT / PACKAGES[d][0]) for d in deps] + [str(ROOT / folder)]


# The environment of every test process (nox's own environment otherwise passes through):
# - Bytecode. Where PYTHONDONTWRITEBYTECODE is set (the CI machine's environment sets it, as many CI images do),
#   every process compiled torch, triton and transformers from source again (uv writes no bytecode at install):
#   `import torch, triton` cost 9.5 s of CPU instead of 5.3 s on the 2-core machine, paid by each session's
#   pytest, each xdist worker and each subprocess test. The bytecode is written instead, once per venv, under
#   .nox/pycache (PYTHONPYCACHEPREFIX: nothing beside the checkout's sources).
# - One torch/OpenMP thread per process: pytest-xdist already runs one worker per core. An explicit
#   OMP_NUM_THREADS is kept.
_TEST_PROCESS_ENV = {
    "PYTHONDONTWRITEBYTECODE": "",  # an empty value is unset, for Python
    "PYTHONPYCACHEPREFIX": str(ROOT / ".nox" / "pycache"),
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _test_matrix() -> list:
    """Each distribution alone with the oldest triton (and oldest transformers): its own venv holding only it and
    its declared dependencies, so a missing dependency fails. The newest triton (and newest transformers, `kernels`)
    once for all of them: one venv with every distribution, all their tests in one pytest run. A venv costs about
    15 s of the 2-core CI machine (install, and compiling torch's bytecode on first import), so the second half of
    the matrix saves seven of them; the isolation it would repeat is triton-independent."""
    oldest, newest = TRITONS[0], TRITONS[-1]
    per_dist = [nox.param(oldest, d, id=f"triton{oldest.replace('.', '')[:2]}-{SHORT[d]}") for d in PACKAGES]
    return per_dist + [nox.param(newest, ALL, id=f"triton{newest.replace('.', '')[:2]}-all")]


ALL = "all"  # the matrix entry that installs every distribution together


@nox.session(python=PYTHONS)
@nox.parametrize("triton,dist", _test_matrix())
def tests(session: nox.Session, triton: str, dist: str) -> None:
    """One distribution's tests in a venv holding only it and its real dependencies, or (``all``) every
    distribution's tests, in one pytest run, in a venv holding them all."""
    dists = list(PACKAGES) if dist == ALL else [dist]
    session.install(*_base_requirements(triton))
    # Non-editable installs: the tests import what a user would get, so a missing dependency or file fails here.
    session.install(*dict.fromkeys(folder for d in dists for folder in _local_folders(d)))
    if "triton-ops" in dists:
        session.install(TRANSFORMERS[triton], *KERNELS.get(triton, []))
    elif "fused-moe" in dists:  # its tests compare with transformers' GptOssMLP / Qwen3-MoE block
        session.install(TRANSFORMERS[triton])
    env = {} if _gpu_present() else {"TRITON_INTERPRET": "1"}
    env.update(_TEST_PROCESS_ENV)
    # (also the first import of torch in this venv: it writes the bytecode every later process reads)
    session.run("python", "-c", "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)",
                env=env)
    # The shared plugin (interpreter without a GPU, the gpu marker, hypothesis profiles) is loaded here, by our
    # own test command: it is no pytest11 entry point, so installing triton-ops-core changes no other project's runs.
    # pytest-xdist: one worker per core (interpreted kernels are single-threaded Python). worksteal hands each
    # worker a contiguous half of the tests (a module's tests stay together, so a module-scoped fixture is mostly
    # set up once) and lets an idle worker take over the rest of the other's share. PYTEST_XDIST_AUTO_NUM_WORKERS
    # sets the count; posargs `-n 0` run serially (`nox -s "tests-3.11(triton36-core)" -- -n 0`).
    # The `all` venv runs every folder in one pytest (one start of the workers, no idle worker at each folder's
    # end); test modules of the same name in two folders need importlib's import mode there.
    # Tests marked newest_only (benchmark harnesses, the four-rank tensor-parallel spawn) run beside the newest
    # triton and transformers only: they check code that does not depend on the triton version, at CPU cost.
    # The kernel packages' parametrized cases (dtypes, shapes, layouts) are split between the two tritons
    # (--param-shard: each function's first case in both, every other case in one): every test function runs on
    # both front ends and every case on one, at half the interpreter time. The model integration's cases (model
    # families, recipes: transformers code paths, a different transformers release in each session) run whole in
    # both (its conftest marks them every_param). `-- --param-shard 0/1` runs every case.
    select = ["--import-mode=importlib"] if dist == ALL else ["-m", "not newest_only"]
    shard = ["--param-shard", f"{TRITONS.index(triton)}/{len(TRITONS)}"]
    session.run("pytest", "-q", "-n", "auto", "--dist", "worksteal", "-p", "triton_ops_core.pytest_plugin",
                "-p", "no:cacheprovider", *select, *shard, *(f"{PACKAGES[d][0]}/tests" for d in dists),
                *session.posargs, env=env)


@nox.session(python="3.11")
def models(session: nox.Session) -> None:
    """The model integration's tests (triton-ops', and fused-moe's against transformers' MoE blocks) against one
    transformers release that the matrix does not pin, e.g. the lent GPU's before a GPU session (its 5.17 named
    Gemma 4's norm epsilon ``eps``, which neither 5.0 nor 5.25 does): ``nox -s models -- 5.17.0 [pytest args]``.
    Newest triton, every distribution in one venv, as the ``triton39-all`` session."""
    if not session.posargs or not re.fullmatch(r"\d+\.\d+(\.\d+)?", session.posargs[0]):
        session.error("usage: nox -s models -- <transformers version, e.g. 5.17.0> [pytest arguments]")
    version, pytest_args = session.posargs[0], session.posargs[1:]
    session.install(*_base_requirements(TRITONS[-1]))
    session.install(*dict.fromkeys(folder for d in PACKAGES for folder in _local_folders(d)))
    session.install(f"transformers=={version}")
    env = {} if _gpu_present() else {"TRITON_INTERPRET": "1"}
    env.update(_TEST_PROCESS_ENV)
    session.run("pytest", "-q", "-n", "auto", "--dist", "worksteal", "-p", "triton_ops_core.pytest_plugin",
                "-p", "no:cacheprovider", "--import-mode=importlib", "packages/triton-ops/tests",
                "packages/fused-moe/tests", *pytest_args, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "shared", "packages", "benchmarks", "noxfile.py")


def py_version(session: nox.Session) -> str:
    return session.python if isinstance(session.python, str) else "3.11"


def _check_installs_alone(session: nox.Session, dist: str, wheel_dir: Path) -> None:
    """Install one wheel into an empty venv with its dependencies (siblings from the built wheels) and import it."""
    _, import_name, _ = PACKAGES[dist]
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        py = str(venv / "bin" / "python")
        uv = shutil.which("uv")
        # torch pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build. Siblings come from the
        # freshly built wheels (--find-links), everything else from the package index.
        if uv:
            session.run(uv, "venv", "-q", "-p", py_version(session), str(venv), external=True, silent=True)
            install = [uv, "pip", "install", "-q", "-p", py]
        else:
            session.run("python", "-m", "venv", str(venv), silent=True)
            install = [py, "-m", "pip", "install", "-q"]
        links = [str(wheel_dir)] + ([str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else [])
        session.run(*install, *(f"--find-links={link}" for link in links), TORCH, dist, external=True, silent=True)
        # A plain import, as on a GPU machine: the interpreter (TRITON_INTERPRET=1) also needs numpy, which triton
        # does not declare; the test sessions install it.
        session.run(py, "-c", f"import {import_name}; print('{dist}', {import_name}.__version__, 'imports alone')",
                    external=True, env={"TRITON_INTERPRET": "0"})


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Build every wheel and sdist with hatchling; install each alone into an empty venv and import it."""
    session.install("hatchling>=1.21")
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    for dist in PACKAGES:
        session.chdir(ROOT / PACKAGES[dist][0])
        session.run("hatchling", "build", "-d", str(dist_dir), silent=True)
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
    session.install("hatchling>=1.21")
    out = ROOT / "dist" / "release" / dist
    shutil.rmtree(out, ignore_errors=True)
    session.chdir(ROOT / PACKAGES[dist][0])
    session.run("hatchling", "build", "-d", str(out), silent=True)
    built = sorted(p.name for p in out.iterdir())
    expected_prefix = dist.replace("-", "_") + "-" + version
    if not built or not all(name.startswith(expected_prefix) for name in built):
        session.error(f"built {built}, expected only {expected_prefix} artifacts")
    session.log(f"release-check ok: {built}")


@nox.session(python="3.11")
def quickstart(session: nox.Session) -> None:
    """docs/quickstart.md's install-from-clone command in a clean venv, as a newcomer runs it, then one example."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    block = re.search(r"<!-- install-from-clone[^\n]*\n```bash\n(.*?)```", text, re.S)
    if block is None:
        session.error("docs/quickstart.md: no install-from-clone block")
    installs = [line.split(" #")[0].split()[2:] for line in block.group(1).splitlines()
                if line.startswith("pip install ")]
    if not installs:
        session.error("docs/quickstart.md: the install-from-clone block has no pip install line")
    # torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build); the interpreter's numpy
    session.install(TORCH, "numpy<2.4")
    for args in installs:
        session.install(*args)  # run from the checkout's root, where the command's ./ paths point
    example = (
        "import torch; from triton_ops import fused_gated_mlp; x = torch.randn(2, 64); "
        "w = torch.randn(32, 64) / 8; out = fused_gated_mlp(x, w, w); "
        "ref = torch.nn.functional.silu(x @ w.T) * (x @ w.T); "
        "assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5); print('quick start install works:', out.shape)"
    )
    session.run("python", "-c", example, env={"TRITON_INTERPRET": "1"})


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """The benchmark suite: the full sweep on a GPU; without one, every kernel on small shapes (interpreter)."""
    session.install(*_base_requirements(TRITONS[0]), "matplotlib>=3.7", "tqdm>=4.60")
    session.install(*_local_folders("triton-ops"))
    env = {} if _gpu_present() else {"TRITON_INTERPRET": "1"}
    session.run("python", "-m", "benchmarks", *session.posargs, env=env)
