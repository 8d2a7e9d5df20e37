"""Adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saving never deletes what it did not write. A save writes its files into a
staging folder inside the target directory, fsyncs them, marks the folder
complete by renaming it, then moves each file over its namesake and fsyncs
the directory. Other files in the directory are left alone. A kill before the
mark leaves the old files untouched (the staging folder is removed by the next
save or load); a kill after it is finished by the next save or load, so a
reader never sees half an adapter.

Reads never unpickle and turn every way a file can be wrong (bad JSON, wrong
field types, truncated or non-finite tensors) into one ``AdapterFileError``
naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "repeft"
FORMAT_VERSION = 1

STAGING = ".repeft-staging-"  # + "<pid>-<random>": being written; removed once its writer is gone
COMMIT = ".repeft-commit-"  # complete; its files are moved into the directory by whoever sees it first
MANIFEST = ".repeft-files"  # in a commit folder: the names of all its files, so a half-done move can finish
# transformers' weight files: a merged save replaces those of an earlier save, as save_pretrained does,
# or a stale model.safetensors would shadow new shards.
TRANSFORMERS_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


class AdapterFileError(ValueError):
    """An adapter directory that is missing, corrupt, or made for another model."""


# -- writing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_write(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder whose files, if the block succeeds, replace their namesakes in ``directory``.

    ``directory`` is created if needed (with the umask's permissions); files in
    it that the block does not write are kept.

    >>> with staged_write("out/adapter") as tmp:  # doctest: +SKIP
    ...     (tmp / "a.json").write_text("{}")
    """
    target = Path(directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=target))
    try:
        yield staging
        mode = _default_file_mode(staging)
        names = sorted(p.name for p in staging.iterdir())
        (staging / MANIFEST).write_text("\n".join(names))
        for name in [*names, MANIFEST]:
            path = staging / name
            if not path.is_file():
                raise ValueError(f"staged_write writes files only; {name} is a directory")
            os.chmod(path, mode)  # safetensors creates its files 0600, whatever the umask
            _fsync(path)
        _fsync(staging)
        ready = target / (COMMIT + staging.name.removeprefix(STAGING))
        os.replace(staging, ready)
        _fsync(target)
        _move_in(ready, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if the failed save left it empty
        raise


def recover(directory: str | os.PathLike) -> None:
    """Finish saves into ``directory`` that were killed after writing, and drop those killed before."""
    target = Path(directory)
    _restore_legacy_copy(target)
    try:
        entries = list(target.iterdir())
    except OSError:
        return
    for entry in sorted(entries):
        try:
            if entry.name.startswith(COMMIT):
                _move_in(entry, target)
            elif entry.name.startswith(STAGING) and not _alive(entry.name.removeprefix(STAGING).split("-")[0]):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # a read-only directory, or another process finishing the same save


def _restore_legacy_copy(target: Path) -> None:
    """Bring back a directory that a save from before staged writes left hidden.

    Those saves renamed the old directory to ``.NAME.old-PID`` before renaming
    the new one in; a kill between the two renames left only the hidden copy.
    The newest such copy whose writer is gone takes the missing name again.
    """
    if target.exists():
        return
    copies = [
        p for p in target.parent.glob(f".{glob.escape(target.name)}.old-*")
        if p.is_dir() and not _alive(p.name.rsplit("-", 1)[-1])
    ]
    if copies:
        with contextlib.suppress(OSError):  # another reader restored it first, or a read-only directory
            os.replace(max(copies, key=lambda p: p.stat().st_mtime), target)


def _move_in(ready: Path, target: Path) -> None:
    """Move a complete save's files into ``target``; safe to repeat after a kill, or in two processes at once."""
    try:
        names = (ready / MANIFEST).read_text().splitlines()
    except FileNotFoundError:
        # The folder is being removed after its files were moved in (by a process killed then, or another one).
        shutil.rmtree(ready, ignore_errors=True)
        return
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # moved before a kill, or by another process
            os.replace(ready / name, target / name)
    _fsync(target)
    if any(TRANSFORMERS_WEIGHTS.fullmatch(n) for n in names):
        for path in target.iterdir():
            if TRANSFORMERS_WEIGHTS.fullmatch(path.name) and path.name not in names:
                path.unlink(missing_ok=True)
    shutil.rmtree(ready, ignore_errors=True)
    _fsync(target)


def _default_file_mode(folder: Path) -> int:
    """0o666 less the umask, read from a new file (``os.umask`` can only be read by setting it)."""
    probe = folder / ".mode"
    probe.touch()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge: leave it
    return True


def write_adapter_dir(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``path`` (see ``staged_write``)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with staged_write(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# -- reading -----------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt, save the adapter again") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _check_exists(path: Path) -> None:
    if path.is_file():
        return
    pickled = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt")]
    hint = (
        f" Found {', '.join(pickled)}: pickle files are never loaded (they can run code); "
        "convert them to safetensors first."
        if pickled
        else ""
    )
    raise AdapterFileError(f"{path} does not exist.{hint}")


def read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """``{tensor name: (shape, safetensors dtype)}`` from the file's header, without reading the tensors."""
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: (fh.get_slice(key).get_shape(), fh.get_slice(key).get_dtype()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; refuses a corrupt file and tensors holding NaN or infinity."""
    read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise AdapterFileError(
                f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                "the adapter was saved from a run that diverged. Load an earlier checkpoint or train again."
            )
    return tensors


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory written by ``write_adapter_dir``."""
    root = Path(path)
    recover(root)
    if not root.is_dir():
        raise AdapterFileError(f"adapter directory {root} does not exist")
    meta = read_json(root / CONFIG_NAME)
    check_meta(meta, root / CONFIG_NAME)
    return meta, read_tensors(root / WEIGHTS_NAME)


def check_meta(meta: dict[str, Any], path: Path) -> None:
    """Check the fields of a repeft ``adapter_config.json`` that the loader reads, before it reads them."""
    if meta.get("format") != FORMAT:
        hint = " It looks like a PEFT adapter: load it with repeft.from_peft." if "peft_type" in meta else ""
        raise AdapterFileError(f"{path} is not a repeft adapter config.{hint}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterFileError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path.parent} was written by a newer repeft (format version {version} > {FORMAT_VERSION}); "
            "upgrade repeft to load it"
        )
    base = meta.get("base_model", {})
    _require(isinstance(meta.get("config"), dict), path, "config", "a JSON object", meta.get("config"))
    _require(isinstance(base, dict), path, "base_model", "a JSON object", base)
    labels = base.get("id2label")
    checks = {
        "architecture": (isinstance(base.get("architecture", {}), dict), "a JSON object"),
        "class": (isinstance(base.get("class", ""), (str, type(None))), "a transformers class name"),
        "id2label": (
            labels is None or (isinstance(labels, dict) and all(k.isdigit() and isinstance(v, str) for k, v in labels.items())),
            'a JSON object of label names, e.g. {"0": "ham", "1": "spam"}',
        ),
    }
    for key, (ok, words) in checks.items():
        _require(ok, path, f"base_model.{key}", words, base.get(key))


def _require(ok: bool, path: Path, field: str, words: str, value: Any) -> None:
    if not ok:
        raise AdapterFileError(f"{path}: {field} must be {words}, got {value!r}; the file was edited or is damaged")
