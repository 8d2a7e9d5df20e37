"""Adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saving never deletes what it did not write. A save writes its files into a
staging folder inside the target directory and fsyncs them; then, holding an
exclusive lock on the directory (``flock``), it marks the folder complete by
renaming it, moves each file over its namesake and fsyncs the directory.
Other files in the directory are left alone.

Reading never writes. A reader holds a shared lock on the directory while it
reads, so it sees one save whole, never two mixed. A save killed before its
mark leaves the old files; one killed while moving files in leaves its
complete folder behind, and readers take the not-yet-moved files from it, so
they see the new save whole. The next save into the directory finishes or
drops what killed saves left, touching only plain files directly inside the
directory whose names are those of adapter and transformers checkpoint files,
and never following a symbolic link.

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
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

try:
    import fcntl
except ImportError:  # Windows: no flock; saves and loads run unlocked, and only kills are covered
    fcntl = None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "repeft"
# Format 1: repeft's fields and tensor names. Format 2: a LoRA adapter's config also holds PEFT's
# adapter_config.json fields and its tensors carry PEFT's names, so PEFT, vLLM and the Hub read the directory
# (repeft.peft_interop); the other methods are still written as format 1. This version reads both.
FORMAT_VERSION = 2
REPEFT_NAMES_VERSION = 1

STAGING = ".repeft-staging-"  # + "<pid>-<random>": being written; removed once its writer is gone
COMMIT = ".repeft-commit-"  # complete; its files are moved into the directory by whoever sees it first
MANIFEST = ".repeft-files"  # in a commit folder: the names of all its files, so a half-done move can finish
# transformers' weight files: a merged save replaces those of an earlier save, as save_pretrained does,
# or a stale model.safetensors would shadow new shards.
TRANSFORMERS_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
# What a killed save's folder may move into the directory: the names of adapter and transformers
# checkpoint files (configs, weights, tokenizer files), one path component, never hidden.
RECOVERABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.(json|safetensors|model|txt|jinja)")


# Float formats an adapter is saved in; float8 tensors are no weights repeft or PEFT writes (and cannot be checked
# for finiteness on every torch build).
ADAPTER_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
            fsync_path(path)
        fsync_path(staging)
        with directory_lock(target, exclusive=True):
            _recover_locked(target, replaces_weights=False)  # a merged save below replaces stale weights itself
            ready = target / (COMMIT + staging.name.removeprefix(STAGING))
            os.replace(staging, ready)
            fsync_path(target)
            _move_in(ready, target, names, replaces_weights=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if the failed save left it empty
        raise


@contextlib.contextmanager
def directory_lock(directory: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``directory`` itself: exclusive while a save moves files in, shared while one reads.

    Locking the directory's own descriptor needs no lock file, so a reader
    writes nothing. Where the directory cannot be opened (it does not exist
    yet) or there is no ``flock`` (Windows, some file systems), the block runs unlocked.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY) if fcntl is not None else None
    except OSError:
        fd = None
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def recover(directory: str | os.PathLike) -> None:
    """Finish saves into ``directory`` that were killed after writing, and drop those killed before.

    A save does this itself first (without removing anything); call it to
    finish a killed merged save without saving again, which also removes
    weight files the finished save replaces. Only plain files directly inside
    ``directory`` with checkpoint file names (``RECOVERABLE_NAME``) are moved
    or removed, and nothing is read or written through a symbolic link.
    """
    target = Path(directory)
    if not _is_real_dir(target):
        return
    with directory_lock(target, exclusive=True):
        _recover_locked(target, replaces_weights=True)


def _recover_locked(target: Path, replaces_weights: bool) -> None:
    for entry in _leftovers(target, COMMIT):
        with contextlib.suppress(OSError):  # a read-only directory
            _move_in(entry, target, _manifest(entry), replaces_weights)
    for entry in _leftovers(target, STAGING):
        if not _alive(entry.name.removeprefix(STAGING).split("-")[0]):
            shutil.rmtree(entry, ignore_errors=True)


def _leftovers(target: Path, prefix: str) -> list[Path]:
    """Real folders (not links) named ``prefix*`` directly in ``target``, oldest first, as saves finish them."""
    try:
        entries = [e for e in target.iterdir() if e.name.startswith(prefix) and _is_real_dir(e)]
    except OSError:
        return []
    return sorted(entries, key=lambda e: (e.lstat().st_mtime_ns, e.name))


def _manifest(commit: Path) -> list[str]:
    """The names a complete save folder lists, those that are checkpoint file names (not paths, not hidden)."""
    try:
        names = (commit / MANIFEST).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [n for n in names if RECOVERABLE_NAME.fullmatch(n)]


def _move_in(ready: Path, target: Path, names: list[str], replaces_weights: bool) -> None:
    """Move a complete save's files into ``target``, then remove the folder.

    ``replaces_weights`` also removes weight files of an earlier merged save
    that the new one does not overwrite, as transformers' ``save_pretrained`` does.
    """
    for name in names:
        destination = target / name
        # Moved before a kill, or not a plain file; os.replace over a link replaces the link, never its target.
        if _is_plain_file(ready / name) and not _is_real_dir(destination):
            os.replace(ready / name, destination)
    fsync_path(target)
    if replaces_weights and any(TRANSFORMERS_WEIGHTS.fullmatch(n) for n in names):
        for path in target.iterdir():
            if TRANSFORMERS_WEIGHTS.fullmatch(path.name) and path.name not in names and _is_plain_file(path):
                path.unlink(missing_ok=True)
    shutil.rmtree(ready, ignore_errors=True)
    fsync_path(target)


def current_files(directory: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Where each of ``names`` is read from: the directory, or the folder of a save killed while moving files in.

    Call it holding ``directory_lock(directory, exclusive=False)``: a folder
    marked complete is then one a dead save left, whose files are newer than
    the directory's. Nothing is written.
    """
    paths = {name: directory / name for name in names}
    for commit in _leftovers(directory, COMMIT):
        listed = set(_manifest(commit))
        paths.update({name: commit / name for name in names if name in listed and _is_plain_file(commit / name)})
    return paths


def readable_dir(directory: Path) -> Path:
    """``directory``, or the hidden copy that a save from before staged writes left in its place.

    Those saves renamed the old directory to ``.NAME.old-PID`` before renaming
    the new one in; a kill between the two renames left only the hidden copy.
    It is read where it lies: reading moves nothing.
    """
    if directory.exists():
        return directory
    copies = [
        p for p in directory.parent.glob(f".{glob.escape(directory.name)}.old-*")
        if _is_real_dir(p) and not _alive(p.name.rsplit("-", 1)[-1])
    ]
    return max(copies, key=lambda p: p.lstat().st_mtime_ns) if copies else directory


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _default_file_mode(folder: Path) -> int:
    """0o666 less the umask, read from a new file (``os.umask`` can only be read by setting it)."""
    probe = folder / ".mode"
    probe.touch()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def fsync_path(path: Path) -> None:
    """Flush ``path`` to disk: a file's data, or a directory's entries after a rename."""
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader, or a kill, sees the old file or the new one.

    >>> write_text_atomic("runs/x/summary.json", "{}")  # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # two writers never share one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the new name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself survives a power cut


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
    except RecursionError:
        raise AdapterFileError(f"{path} nests JSON too deeply to be an adapter config; the file is damaged or hostile") from None
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
        if tensor.is_floating_point() and tensor.dtype not in ADAPTER_FLOAT_DTYPES:
            raise AdapterFileError(
                f"{path}: tensor {key!r} is {tensor.dtype}; adapter weights are stored as float16, bfloat16, float32 "
                "or float64. Convert the file, or save the adapter again from the model"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise AdapterFileError(
                f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                "the adapter was saved from a run that diverged. Load an earlier checkpoint or train again."
            )
    return tensors


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory written by ``write_adapter_dir`` (or by PEFT); writes nothing.

    >>> meta, tensors = read_adapter_dir("out/adapter")  # doctest: +SKIP
    """
    with reading(path) as files:
        meta = read_json(files[CONFIG_NAME])
        check_meta(meta, files[CONFIG_NAME])
        return meta, read_tensors(files[WEIGHTS_NAME])


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[dict[str, Path]]:
    """Yield the paths of the adapter files of ``path`` under a shared lock: one save's files, whole."""
    root = readable_dir(Path(path))
    if not root.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    with directory_lock(root, exclusive=False):
        yield current_files(root, (CONFIG_NAME, WEIGHTS_NAME))


def check_meta(meta: dict[str, Any], path: Path) -> None:
    """Check the fields of a repeft ``adapter_config.json`` that the loader reads, before it reads them.

    PEFT's own ``adapter_config.json`` (``peft_type``, no ``format``) passes: ``repeft.peft_interop`` checks
    its fields when it converts the adapter.
    """
    if "format" not in meta and "peft_type" in meta:
        return
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is neither a repeft adapter config (format: repeft) nor a PEFT one (peft_type)")
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
