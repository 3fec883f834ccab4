"""The persistent config cache: one JSON file per kernel, merged under a file lock, replaced atomically.

Layout: ``$KERNEL_AUTOTUNE_CACHE_DIR/<kernel name>.json`` (default ``~/.cache/triton-ops/autotune``)::

    {"format": "kernel-autotune-configs", "format_version": 1,
     "entries": {"<canonical key JSON>": {"key": {...}, "config": {...}, "latency_ms": ..., ...}}}

A kernel package's shipped ``tuned_configs.json`` has the same schema (several kernels in one file).
No pickle anywhere: a cache file is data, never code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .keys import key_string, legacy_key_string, relaxed_key_string

FORMAT = "kernel-autotune-configs"
FORMAT_VERSION = 1
ENV_CACHE_DIR = "KERNEL_AUTOTUNE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/triton-ops/autotune")
LOCK_TIMEOUT_S = 120.0

Entry = dict[str, Any]


class CacheFileWarning(UserWarning):
    """A cache or shipped file could not be used (corrupt, foreign or from a newer format); it is ignored."""


_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def _warn_once(path: Path, reason: str) -> None:
    with _warn_lock:
        token = (str(path), reason)
        if token in _warned:
            return
        _warned.add(token)
    warnings.warn(f"kernel-autotune: ignoring {path}: {reason}", CacheFileWarning, stacklevel=3)


def cache_dir() -> Path:
    """The cache directory: ``$KERNEL_AUTOTUNE_CACHE_DIR`` or ``~/.cache/triton-ops/autotune`` (read each call)."""
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def cache_file(kernel: str, directory: Path | str | None = None) -> Path:
    """The file holding ``kernel``'s entries (name made filesystem-safe)."""
    safe = _UNSAFE.sub("_", kernel).lstrip(".") or "_"
    return Path(directory if directory is not None else cache_dir()) / f"{safe}.json"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- reading -------------------------------------------------------------------------------------


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("key"), dict)
            and isinstance(entry.get("config"), dict) and isinstance(entry["key"].get("kernel"), str))


def parse_document(doc: Any) -> tuple[dict[str, Entry] | None, str | None]:
    """Entries of a parsed JSON document, or ``(None, reason)`` when it is not one of ours."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None, f"not a kernel-autotune file (no \"format\": \"{FORMAT}\")"
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return None, f"format_version {version!r} is not supported (this kernel-autotune reads <= {FORMAT_VERSION})"
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        return None, "\"entries\" is not an object"
    good = {k: v for k, v in entries.items() if _valid_entry(v)}
    if len(good) != len(entries):
        return good, f"{len(entries) - len(good)} malformed entries skipped"
    return good, None


def _read(path: Path) -> tuple[dict[str, Entry] | None, str | None]:
    """(entries, problem): entries None means the whole file is unusable; missing file -> ({}, None)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    try:
        doc = json.loads(text)
    except ValueError as e:
        return None, f"corrupt JSON ({e})"
    return parse_document(doc)


class _Parsed:
    """One parsed file: its entries, their indexes for relaxed matching, and the devices it has entries for."""

    __slots__ = ("devices", "entries", "legacy", "relaxed", "stamp")

    def __init__(self, stamp: tuple[int, int, int], entries: dict[str, Entry]) -> None:
        self.stamp = stamp
        self.entries = entries
        self.relaxed: dict[str, Entry] = {}
        self.legacy: dict[str, Entry] = {}  # entries whose key has no "capability" (kernel-autotune 0.1)
        self.devices: set[tuple[str, str | None]] = set()
        # Sorted so that, among entries differing only in versions, the newest tuning wins deterministically.
        for entry in sorted(entries.values(), key=lambda e: str(e.get("tuned_at", ""))):
            key = entry["key"]
            if "capability" in key:
                self.relaxed[relaxed_key_string(key)] = entry
            else:
                self.legacy[legacy_key_string(key)] = entry
            self.devices.add((str(key.get("device", "")), key.get("capability")))


_EMPTY = _Parsed((0, 0, 0), {})

# Parsed files, re-read only when their inode, size or mtime changes: a lookup costs one stat.
_parsed: dict[str, _Parsed] = {}
_parsed_lock = threading.Lock()


def _load(path: Path) -> _Parsed:
    try:
        st = path.stat()
    except OSError:
        return _EMPTY
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # os.replace gives a new inode
    p = str(path)
    with _parsed_lock:
        hit = _parsed.get(p)
    if hit is not None and hit.stamp == stamp:
        return hit
    entries, problem = _read(path)
    if problem is not None:
        _warn_once(path, problem)
    parsed = _Parsed(stamp, entries or {})
    with _parsed_lock:
        _parsed[p] = parsed
    return parsed


def read_entries(path: Path | str) -> dict[str, Entry]:
    """All valid entries of a cache or shipped file ({} when missing; warns once if corrupt or foreign)."""
    return dict(_load(Path(path)).entries)


def lookup(path: Path | str, key: Mapping[str, Any], *, relaxed: bool = False) -> Entry | None:
    """The entry for ``key`` in ``path``; with ``relaxed``, fall back to one that differs only in versions (and,
    for an entry written before keys named the compute capability, one of the same product name)."""
    parsed = _load(Path(path))
    entry = parsed.entries.get(key_string(key))
    if entry is None and relaxed:
        entry = parsed.relaxed.get(relaxed_key_string(key))
        if entry is None and parsed.legacy:
            entry = parsed.legacy.get(legacy_key_string(key))
    return entry


def devices(path: Path | str) -> set[tuple[str, str | None]]:
    """The ``(device name, capability)`` pairs ``path`` has entries for (capability None: an entry from before keys
    named it, which counts for every capability of that name)."""
    return set(_load(Path(path)).devices)


def has_device(path: Path | str, identity: tuple[str, str | None]) -> bool:
    """Whether ``path`` (a shipped file) has any entry for the device ``(name, capability)``."""
    present = _load(Path(path)).devices
    return identity in present or (identity[0], None) in present


# ---- writing -------------------------------------------------------------------------------------


class _Lock:
    """An inter-process lock on ``<path>.lock`` (``filelock``, which torch itself depends on)."""

    def __init__(self, path: Path) -> None:
        self._impl = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)

    def __enter__(self) -> _Lock:
        self._impl.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._impl.release()


TUNING_LOCK_SUFFIX = ".tuning.lock"
TUNING_LOCK_TIMEOUT_S = 900.0


@contextlib.contextmanager
def tuning_lock(path: Path | str, timeout: float = TUNING_LOCK_TIMEOUT_S) -> Iterator[bool]:
    """Held while a process tunes a kernel of cache file ``path`` on first use (``<path>.tuning.lock``): another
    process that needs the same kernel waits, then finds the result in the cache instead of tuning it again (and two
    tunings never share the GPU, which would skew both). Yields True once acquired, False after ``timeout`` s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + TUNING_LOCK_SUFFIX, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def document(entries: Mapping[str, Entry]) -> dict[str, Any]:
    """A complete file document for ``entries``."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "entries": {k: entries[k] for k in sorted(entries)}}


def write_document(path: Path, entries: Mapping[str, Entry]) -> None:
    """Write ``entries`` to ``path`` atomically: a temporary file in the same directory, then os.replace.

    Readers see the old file or the new one, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document(entries), f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def update(path: Path | str, change: Callable[[dict[str, Entry]], dict[str, Entry]]) -> dict[str, Entry]:
    """Read-modify-write ``path`` under its lock: ``change`` gets the current entries, returns the new ones.

    Holding the lock across the read and the write is what makes concurrent writers merge instead of
    overwrite. An unusable existing file is reported once, moved aside to ``<name>.corrupt``, and
    replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(path):
        current, problem = _read(path)
        if current is None:
            _warn_once(path, f"{problem}; moved aside to {path.name}.corrupt")
            try:
                os.replace(path, Path(str(path) + ".corrupt"))
            except OSError:
                pass
            current = {}
        new = change(dict(current))
        write_document(path, new)
    _notify_write()
    return new


def store(path: Path | str, entries: Iterable[Entry]) -> None:
    """Merge ``entries`` into the file at ``path`` (same key: the new entry wins)."""
    new = {key_string(e["key"]): e for e in entries}

    def merge(current: dict[str, Entry]) -> dict[str, Entry]:
        current.update(new)
        return current

    update(path, merge)


def remove(path: Path | str, predicate: Callable[[Entry], bool]) -> int:
    """Remove the entries for which ``predicate`` is true; returns how many went."""
    removed = 0

    def drop(current: dict[str, Entry]) -> dict[str, Entry]:
        nonlocal removed
        keep = {k: e for k, e in current.items() if not predicate(e)}
        removed = len(current) - len(keep)
        return keep

    if Path(path).exists():
        update(path, drop)
    return removed


def cache_files(directory: Path | str | None = None) -> list[Path]:
    """The cache files in ``directory`` (default: the cache directory), without the trial side files."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.json") if not p.name.startswith(".") and not p.name.endswith(TRIALS_SUFFIX))


TRIALS_SUFFIX = ".trials.json"


def trials_file(path: Path | str) -> Path:
    """The side file holding every trial of the entries in cache file ``path``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + TRIALS_SUFFIX)


def store_trials(path: Path | str, key: Mapping[str, Any], trials: Iterable[Any]) -> None:
    """Record the trials of ``key``'s tuning in the side file of cache file ``path``."""
    items = [t.to_dict() if hasattr(t, "to_dict") else dict(t) for t in trials]
    store(trials_file(path), [{"key": dict(key), "config": {}, "trials": items}])


def load_trials(path: Path | str, key: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trials recorded for ``key`` next to cache file ``path`` ([] when none)."""
    entry = lookup(trials_file(path), key)
    trials = entry.get("trials") if entry else None
    return [t for t in trials if isinstance(t, dict) and "config" in t] if isinstance(trials, list) else []


# Writers call back here so select_config's in-process memo never serves a config older than the disk.
_write_listeners: list[Callable[[], None]] = []


def _notify_write() -> None:
    for listener in _write_listeners:
        listener()


def forget_parsed() -> None:
    """Drop the parsed-file cache and the warned-about set (tests; a long-lived process after manual edits)."""
    with _parsed_lock:
        _parsed.clear()
    with _warn_lock:
        _warned.clear()


__all__ = [
    "DEFAULT_CACHE_DIR",
    "ENV_CACHE_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "CacheFileWarning",
    "cache_dir",
    "cache_file",
    "cache_files",
    "devices",
    "document",
    "forget_parsed",
    "has_device",
    "load_trials",
    "lookup",
    "parse_document",
    "read_entries",
    "remove",
    "store",
    "store_trials",
    "trials_file",
    "tuning_lock",
    "update",
    "write_document",
]
