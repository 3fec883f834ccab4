import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helper module (kernels and a fake family) for subprocess tests
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets an empty cache directory and a fresh in-process memo."""
    from kernel_autotune import cache, clear_memo

    d = tmp_path / "cache"
    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(d))
    monkeypatch.delenv("KERNEL_AUTOTUNE", raising=False)
    clear_memo()
    cache.forget_parsed()
    yield d
    clear_memo()
    cache.forget_parsed()
