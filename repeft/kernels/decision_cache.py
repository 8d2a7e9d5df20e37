"""The on-disk cache of ``auto``'s kernel decisions (``REPEFT_KERNEL_CACHE``): a JSON object, key -> entry.

The cache only saves time, so it never breaks a forward: a file that cannot be
read, is not a JSON object, or holds entries that are not decisions is ignored
(entry by entry where it can be), and a file that cannot be written keeps the
decisions in the process; one warning per file and process says so.
Saving reads the file, merges the new entry in and replaces the file whole
(temporary file + rename) under a lock file, so a reader never sees half a file
and processes saving at once all keep their entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

ENV_VAR = "REPEFT_KERNEL_CACHE"

_warned: set[str] = set()  # cache files this process already warned about


def read(path: str, is_valid: Callable[[Any], bool]) -> dict[str, dict]:
    """The entries of the cache file at ``path`` that pass ``is_valid`` (``{}`` when there is no file)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not JSON, not UTF-8, nested too deep
        _warn_once(path, f"cannot read it ({type(exc).__name__}: {exc})")
        return {}
    if not isinstance(data, dict):
        _warn_once(path, f"it holds a JSON {type(data).__name__}, not an object of decisions")
        return {}
    valid = {key: entry for key, entry in data.items() if is_valid(entry)}
    if len(valid) < len(data):
        _warn_once(path, f"{len(data) - len(valid)} of its {len(data)} entries are not kernel decisions")
    return valid


def add(path: str, key: str, entry: dict, is_valid: Callable[[Any], bool]) -> dict[str, dict]:
    """Save ``entry`` under ``key``, keeping the valid entries already on disk; return all of them.

    If the file cannot be written, warns once and returns ``{key: entry}``.
    """
    try:
        with _lock(path):
            entries = read(path, is_valid)
            entries[key] = entry
            _replace_json(path, entries)
    except OSError as exc:
        _warn_once(path, f"cannot write it ({type(exc).__name__}: {exc}); decisions stay in this process")
        return {key: entry}
    return entries


def forget_warnings() -> None:
    """Warn again about problems already warned about (a fresh process's state)."""
    _warned.clear()


def _warn_once(path: str, problem: str) -> None:
    if path in _warned:
        return
    _warned.add(path)
    warnings.warn(f"repeft: ignoring the kernel cache {path} ({ENV_VAR}): {problem}", stacklevel=4)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path + ".lock"`` around the read-merge-replace of the cache file."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the merge still keeps what others saved before our read
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_json(path: str, data: dict) -> None:
    """Replace ``path`` by ``data`` as JSON in one step, through a temporary file of its own."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
