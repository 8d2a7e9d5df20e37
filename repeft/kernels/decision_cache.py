"""``auto``'s kernel decisions (``Decision``) and their on-disk cache (``REPEFT_KERNEL_CACHE``): a JSON object, key -> entry.

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
import dataclasses
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..files import write_text_atomic

ENV_VAR = "REPEFT_KERNEL_CACHE"

_warned: set[str] = set()  # cache files this process already warned about


@dataclass
class Decision:
    """What ``auto`` uses for one bucket, and why."""

    backend: str
    reason: str
    bucket: dict[str, Any]
    torch_ms: float | None = None
    fused_ms: float | None = None
    max_error: float | None = None


_DECISION_FIELDS = {f.name for f in dataclasses.fields(Decision)}
_DECISION_NUMBERS = ("torch_ms", "fused_ms", "max_error")


def is_decision(entry: Any) -> bool:
    """Whether ``entry`` is a decision as ``add`` writes it (``Decision(**entry)`` then holds)."""
    if not isinstance(entry, dict) or not {"backend", "reason", "bucket"} <= set(entry) <= _DECISION_FIELDS:
        return False
    numbers_ok = all(
        entry.get(name) is None or (isinstance(entry[name], (int, float)) and not isinstance(entry[name], bool))
        for name in _DECISION_NUMBERS
    )
    return entry["backend"] in ("triton", "torch") and isinstance(entry["reason"], str) \
        and isinstance(entry["bucket"], dict) and numbers_ok


def read(path: str) -> dict[str, dict]:
    """The entries of the cache file at ``path`` that are decisions (``{}`` when there is no file)."""
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
    valid = {key: entry for key, entry in data.items() if is_decision(entry)}
    if len(valid) < len(data):
        _warn_once(path, f"{len(data) - len(valid)} of its {len(data)} entries are not kernel decisions")
    return valid


def add(path: str, key: str, entry: dict) -> dict[str, dict]:
    """Save ``entry`` under ``key``, keeping the valid entries already on disk; return all of them.

    If the file cannot be written, warns once and returns ``{key: entry}``.
    """
    try:
        with _lock(path):
            entries = read(path)
            entries[key] = entry
            write_text_atomic(path, json.dumps(entries, indent=1))
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
