import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedpft_dist.data.labelled import LabelledData, load_labelled, tokenize_cached, train_test_split
from fedpft_dist.errors import UserError


@pytest.fixture(scope="module")
def tweets() -> LabelledData:
    return load_labelled("tweets")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- built-in corpora


def test_bbcnews():
    data = load_labelled("bbcnews")
    assert len(data) == len(data.labels) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(data.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    # Sorted by label, then file name: business/001.txt comes first.
    assert data.labels == sorted(data.labels)
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(t and "\n" not in t and "  " not in t for t in data.texts)


def test_tweets(tweets):
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert 37_000 < len(tweets) < 39_000
    counts = Counter(tweets.labels)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 5_000
    assert all(t.strip() for t in tweets.texts)
    assert tweets.texts[0].startswith("I just don't trust my life in google's hands")
    assert tweets.labels[0] == 0


# ---- local files


def test_local_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars,extra\n\"good,  fine\",pos,1\nawful,neg,2\n,pos,3\n  ok  ,pos,4\n", encoding="utf-8")
    data = load_labelled(str(path), text_column="review", label_column="stars", max_dropped_fraction=0.5)
    assert data.texts == ["good, fine", "awful", "ok"]  # the empty text row is dropped
    assert data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 1]
    assert data.source == str(path)


def test_local_jsonl_with_int_labels_sorts_numerically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2},
                                              {"text": "c", "label": 10}, {"text": "d", "label": None}])
    data = load_labelled(str(path), max_dropped_fraction=0.5)
    assert data.label_names == ["2", "10"]
    assert data.labels == [1, 0, 1]
    assert data.texts == ["a", "b", "c"]


def test_local_parquet(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"sentence": ["x", "y", "z"], "y": [1, 0, 1]}).to_parquet(str(path))
    data = load_labelled(str(path), text_column="sentence", label_column="y")
    assert (data.texts, data.labels, data.label_names) == (["x", "y", "z"], [1, 0, 1], ["0", "1"])


def test_missing_column_names_it_and_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "topic": "x"}, {"text": "b", "topic": "y"}])
    with pytest.raises(UserError, match=r"d\.jsonl' has no column 'label' \(columns: text, topic\)") as err:
        load_labelled(str(path))
    assert "\n" not in str(err.value)


def test_fewer_than_two_labels(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(UserError, match=r"one\.jsonl'.*at least 2 distinct labels in column 'label', found 1"):
        load_labelled(str(path))


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "is empty"),
    ("blank.jsonl", "\n\n", "is empty"),
    ("header.csv", "text,label\n", "has no rows"),
    ("nulls.jsonl", '{"text": null, "label": "a"}\n', r"dropped 1 of 1 rows \(1 without text\); rows 1: no row is left"),
    # the parser's own message gives a byte position ("Trailing data at position 36"): the line instead
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n{"text": "c", "label": "x"}\n',
     r"line 2 is not JSON: Expecting ',' delimiter \(column 14\)"),
])
def test_empty_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        load_labelled(str(path))
    assert name in str(err.value)


def test_other_user_errors(tmp_path):
    with pytest.raises(UserError, match="'nowhere.csv' does not exist"):
        load_labelled("nowhere.csv")
    (tmp_path / "d.txt").write_text("text\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.txt' has an unknown extension"):
        load_labelled(str(tmp_path / "d.txt"))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}])
    with pytest.raises(UserError, match="mix strings and numbers"):
        load_labelled(str(mixed))
    numeric_text = write_jsonl(tmp_path / "num.jsonl", [{"text": 1, "label": "x"}, {"text": 2, "label": "y"}])
    with pytest.raises(UserError, match="column 'text' of .*num.jsonl' must hold text"):
        load_labelled(str(numeric_text))


# ---- label columns that hold no classes


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.csv"])
def test_regression_target_is_rejected(tmp_path, name):
    path = tmp_path / name
    rows = [{"text": f"t{i}", "score": s} for i, s in enumerate([1.0, 0.37, 2.0, 1.0])]
    if name.endswith(".csv"):
        path.write_text("text,score\n" + "".join(f"{r['text']},{r['score']}\n" for r in rows), encoding="utf-8")
    else:
        write_jsonl(path, rows)
    with pytest.raises(UserError) as err:
        load_labelled(str(path), label_column="score")
    assert str(err.value) == (f"labelled data file '{path}': labels in column 'score' must be class ids, found the "
                              f"non-integer 0.37; fedpft trains classifiers, regression targets are not supported")


def test_integer_valued_float_labels_are_classes(tmp_path):
    import datasets

    # A gap in a CSV column makes pandas read it as floats: 1.0, NaN, 0.0, ...
    csv_path = tmp_path / "gaps.csv"
    csv_path.write_text("text,label\na,1\nb,\nc,0\nd,1\ne,0\n", encoding="utf-8")
    data = load_labelled(str(csv_path), max_dropped_fraction=0.5)
    assert (data.texts, data.labels, data.num_classes) == (["a", "c", "d", "e"], [1, 0, 1, 0], 2)
    parquet_path = tmp_path / "floats.parquet"
    datasets.Dataset.from_dict({"text": list("abcdef"), "label": [1.0, 2.0, 0.0, 2.0, 1.0, 0.0]}).to_parquet(
        str(parquet_path))
    data = load_labelled(str(parquet_path))
    assert (data.labels, data.num_classes) == ([1, 2, 0, 2, 1, 0], 3)


def test_more_classes_than_half_the_rows_is_rejected(tmp_path):
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"text": f"t{i}", "label": i % 5} for i in range(9)])
    with pytest.raises(UserError) as err:
        load_labelled(str(ids))
    assert str(err.value) == (f"labelled data file '{ids}': 5 distinct labels in column 'label' for 9 rows (fewer "
                              f"than 2 examples per class on average); fedpft trains classifiers, regression "
                              f"targets are not supported")
    names = write_jsonl(tmp_path / "names.jsonl", [{"text": "a", "label": w} for w in ("x", "y", "z", "x")])
    with pytest.raises(UserError, match=r"names\.jsonl': 3 distinct labels in column 'label' for 4 rows"):
        load_labelled(str(names))
    # Two examples per class on average is enough; so are two classes, however few the rows.
    assert load_labelled(str(write_jsonl(tmp_path / "ok.jsonl", [{"text": f"t{i}", "label": i % 5}
                                                                   for i in range(10)]))).num_classes == 5
    assert load_labelled(str(write_jsonl(tmp_path / "two.jsonl", [{"text": "a", "label": 0},
                                                                    {"text": "b", "label": 1}]))).num_classes == 2


# ---- train/test split


def test_split_unstratified():
    train, test = train_test_split(100, 0.2, seed=0)
    assert len(test) == 20 and sorted(train + test) == list(range(100))
    assert train == sorted(train) and test == sorted(test)
    assert train_test_split(100, 0.2, seed=0) == (train, test)
    assert train_test_split(100, 0.2, seed=1) != (train, test)
    assert train_test_split(2, 0.01, seed=0)[1] != []  # at least one test sample
    assert train_test_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(10, 1.0, seed=0)


def test_split_stratified_keeps_class_proportions():
    labels = [0] * 500 + [1] * 300 + [2] * 50 + [3] * 2 + [4]
    train, test = train_test_split(len(labels), 0.1, seed=0, labels=labels)
    assert sorted(train + test) == list(range(len(labels)))
    assert Counter(labels[i] for i in test) == {0: 50, 1: 30, 2: 5, 3: 1}  # a 1-sample class stays in train
    assert train_test_split(len(labels), 0.1, seed=0, labels=labels) == (train, test)
    assert train_test_split(len(labels), 0.1, seed=1, labels=labels) != (train, test)
    with pytest.raises(ValueError, match="labels must have length n=3"):
        train_test_split(3, 0.5, seed=0, labels=[0, 1])


def test_split_tweets_stratified(tweets):
    train, test = train_test_split(len(tweets), 0.2, seed=0, labels=tweets.labels)
    overall, held = Counter(tweets.labels), Counter(tweets.labels[i] for i in test)
    for c in overall:
        assert abs(held[c] / len(test) - overall[c] / len(tweets)) < 1e-3


# ---- tokenisation cache


def test_tokenize_cached_round_trip(minilm, tmp_path, monkeypatch):
    texts = ["Hello world.", "A much longer sentence that certainly does not fit in sixteen tokens at all, "
             "no matter how it is cut.", ""]
    expected_first = minilm(texts[0])["input_ids"]
    calls = []
    original = type(minilm).__call__

    def counting_call(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(minilm), "__call__", counting_call)
    first = tokenize_cached(minilm, texts, 16, str(tmp_path))
    assert len(calls) == 1
    # no temp file left behind; the lock the ranks of a job take while one of them tokenises stays
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".safetensors"]

    ids, mask, lengths = first["input_ids"], first["attention_mask"], first["lengths"]
    assert ids.shape == mask.shape == (3, 16) and lengths.shape == (3,)
    assert ids.dtype == mask.dtype == lengths.dtype == torch.long
    assert lengths.tolist() == [5, 16, 2]  # [CLS] hello world . [SEP] / truncated / [CLS] [SEP]
    assert torch.equal(mask.sum(1), lengths)
    assert (ids[:, 0] == minilm.cls_token_id).all()
    assert ids[0, 4] == minilm.sep_token_id and (ids[0, 5:] == minilm.pad_token_id).all()
    assert ids[0, :5].tolist() == expected_first

    second = tokenize_cached(minilm, texts, 16, str(tmp_path))
    assert len(calls) == 1, "the second call must read the cache"
    assert all(torch.equal(first[k], second[k]) for k in first)

    # Other texts or another max_length are other cache entries; no cache dir means no file.
    tokenize_cached(minilm, texts[:2], 16, str(tmp_path))
    tokenize_cached(minilm, texts, 8, str(tmp_path))
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    uncached = tokenize_cached(minilm, texts, 16, None)
    assert len(calls) == 4 and all(torch.equal(first[k], uncached[k]) for k in first)


def test_tokenize_cached_rewrites_a_broken_cache_file(minilm, tmp_path):
    first = tokenize_cached(minilm, ["some text"], 8, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not safetensors")
    again = tokenize_cached(minilm, ["some text"], 8, tmp_path)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert tokenize_cached(minilm, ["some text"], 8, tmp_path)["input_ids"].shape == (1, 8)


class EosOnlyTokenizer:
    """A GPT-like stand-in: one id per word, an eos token and no pad token, left padding."""

    name_or_path = "eos-only"
    pad_token_id = None
    eos_token_id = 0
    padding_side = "left"
    vocab_size = 100

    def __call__(self, texts, truncation, max_length, padding):
        assert truncation and not padding
        return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}


def test_tokenize_without_pad_token_pads_with_eos_on_the_left(tmp_path):
    out = tokenize_cached(EosOnlyTokenizer(), ["ab cde", "a b c d e f"], 4, tmp_path)
    assert out["input_ids"].tolist() == [[0, 0, 2, 3], [1, 1, 1, 1]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out["lengths"].tolist() == [2, 4]
    empty = tokenize_cached(EosOnlyTokenizer(), [], 4, tmp_path)
    assert empty["input_ids"].shape == (0, 4) and empty["lengths"].shape == (0,)


def test_held_back_texts_are_in_no_client_and_no_test_split(tmp_path):
    """In-domain public text: the training rows data.max_train leaves out, and nothing else."""
    from fedpft_dist.config import load_config
    from fedpft_dist.data.tasks import _subset, held_back_texts

    rows = [{"text": f"row {i}", "label": i % 3} for i in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.dataset={path}", "data.max_train=20", "data.test_fraction=0.25"])
    held = held_back_texts(cfg)
    train_idx, test_idx = train_test_split(60, 0.25, cfg.run.seed, [r["label"] for r in rows])
    clients = {f"row {i}" for i in _subset(train_idx, 20, cfg.run.seed + 1)}
    test = {f"row {i}" for i in test_idx}
    assert len(held) == len(set(held)) == len(train_idx) - 20
    assert not set(held) & clients and not set(held) & test
    assert set(held) | clients == {f"row {i}" for i in train_idx}
