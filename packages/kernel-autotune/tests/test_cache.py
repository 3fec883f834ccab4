import json
import multiprocessing as mp
import warnings

import pytest
from kernel_autotune import CacheFileWarning, cache
from kernel_autotune.keys import key_string


def entry(i, kernel="k.fwd", latency=1.0):
    key = {"kernel": kernel, "version": "1", "problem": {"n": i}, "dtypes": ["float32"], "device": "cpu-interpreter",
           "triton": "3.6.0"}
    return {"key": key, "config": {"BLOCK_SIZE": 16 * (1 + i % 4)}, "latency_ms": latency}


def test_round_trip_and_atomic_layout(cache_dir):
    path = cache.cache_file("k.fwd")
    assert path == cache_dir / "k.fwd.json"
    cache.store(path, [entry(1), entry(2)])
    doc = json.loads(path.read_text())
    assert doc["format"] == cache.FORMAT and doc["format_version"] == cache.FORMAT_VERSION
    assert set(doc["entries"]) == {key_string(entry(1)["key"]), key_string(entry(2)["key"])}
    assert cache.lookup(path, entry(2)["key"])["config"] == {"BLOCK_SIZE": 48}
    assert not list(cache_dir.glob("*.tmp"))  # the temporary file was renamed into place


def test_store_merges_and_the_newest_entry_wins(cache_dir):
    path = cache.cache_file("k.fwd")
    cache.store(path, [entry(1, latency=5.0)])
    cache.store(path, [entry(2)])
    cache.store(path, [entry(1, latency=3.0)])
    entries = cache.read_entries(path)
    assert len(entries) == 2 and entries[key_string(entry(1)["key"])]["latency_ms"] == 3.0


def test_unsafe_kernel_names_stay_inside_the_cache_dir(cache_dir):
    path = cache.cache_file("../../etc/passwd")
    assert path.parent == cache_dir and "/" not in path.name


@pytest.mark.parametrize("content,reason", [
    ("{not json", "corrupt JSON"),
    ('{"entries": {}}', "not a kernel-autotune file"),
    ('[1, 2, 3]', "not a kernel-autotune file"),
    ('{"format": "kernel-autotune-configs", "format_version": 99, "entries": {}}', "format_version"),
    (b"\xff\xfe\x00garbage", "unreadable"),
])
def test_corrupt_or_foreign_files_are_reported_once_and_ignored(cache_dir, content, reason):
    path = cache.cache_file("k.fwd")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(CacheFileWarning, match=reason):
        assert cache.lookup(path, entry(1)["key"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second look says nothing more
        assert cache.lookup(path, entry(1)["key"]) is None
        assert cache.read_entries(path) == {}
    # Writing replaces the unusable file, keeping it aside for inspection.
    cache.forget_parsed()
    with pytest.warns(CacheFileWarning, match="moved aside"):
        cache.store(path, [entry(1)])
    assert cache.lookup(path, entry(1)["key"])["config"] == entry(1)["config"]
    raw = content if isinstance(content, bytes) else content.encode()
    assert (cache_dir / "k.fwd.json.corrupt").read_bytes() == raw


def test_malformed_entries_are_skipped_with_a_warning(cache_dir):
    path = cache.cache_file("k.fwd")
    good = entry(1)
    doc = cache.document({key_string(good["key"]): good})
    doc["entries"]["junk"] = {"config": "nope"}
    cache_dir.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    with pytest.warns(CacheFileWarning, match="1 malformed"):
        assert cache.lookup(path, good["key"]) == good


def _writer(args):
    directory, worker, count = args
    import os

    os.environ["KERNEL_AUTOTUNE_CACHE_DIR"] = directory
    from kernel_autotune import cache as c

    for i in range(count):
        c.store(c.cache_file("k.fwd"), [entry(worker * 1000 + i)])


def test_concurrent_writers_lose_nothing(cache_dir):
    workers, count = 4, 25
    # Separate processes (separate file descriptors and locks); fork where there is one: spawning would
    # re-import torch in every worker, seconds each on the CI machine.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_writer, [(str(cache_dir), w, count) for w in range(workers)])
    entries = cache.read_entries(cache.cache_file("k.fwd"))
    assert len(entries) == workers * count
    assert {e["key"]["problem"]["n"] for e in entries.values()} == {w * 1000 + i for w in range(workers)
                                                                    for i in range(count)}
