"""Every Python example of the root README and of docs/quickstart.md runs as written (under the interpreter on CPU).

Each ```python block is written to a file and run with ``runpy`` in a fresh namespace: blocks must be
self-contained, and ``@triton.jit`` kernels in them can read their source, as in a user's script. A block whose
first line is ``# needs a GPU`` (sizes too large for the interpreter) runs only where a GPU is used.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2] if (HERE.parents[2] / "docs").is_dir() else None
DOCS = ["README.md", "docs/quickstart.md"]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks() -> list:
    if REPO is None:
        return []
    params = []
    for doc in DOCS:
        path = REPO / doc
        if not path.is_file():
            continue
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            code = match.group(1)
            marks = [pytest.mark.gpu] if code.lstrip().lower().startswith("# needs a gpu") else []
            params.append(pytest.param(doc, line, code, id=f"{doc}:{line}", marks=marks))
    return params


BLOCKS = _blocks()


def test_docs_have_examples() -> None:
    if REPO is None:
        pytest.skip("needs the monorepo checkout (README.md, docs/)")
    assert any(p.values[0] == "docs/quickstart.md" for p in BLOCKS), "docs/quickstart.md lost its python examples"


@pytest.mark.parametrize(("doc", "line", "code"), BLOCKS)
def test_example_runs_as_written(doc: str, line: int, code: str, tmp_path, monkeypatch) -> None:
    script = tmp_path / f"example_{Path(doc).stem}_{line}.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "autotune-cache"))
    runpy.run_path(str(script), run_name="__main__")
