"""Hugging Face datasets as inputs (a save_to_disk directory; hf:NAME[:CONFIG][@SPLIT] from the local
cache, never downloaded) and loud data cleaning (dropped rows counted, warned about once, an error past
data.max_dropped_fraction)."""
import json
import logging

import pytest

from conftest import run_cli
from fedpft_dist.data.labelled import load_labelled
from fedpft_dist.data.public import load_public_text
from fedpft_dist.errors import UserError

NAMES = ["negative", "neutral", "positive"]


def _splits(n_train=120, n_val=48):
    """Real tweets (the built-in corpus) as a DatasetDict with a ClassLabel column named "sentiment"."""
    import datasets

    tweets = load_labelled("tweets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "sentiment": datasets.ClassLabel(names=NAMES)})
    assert tweets.label_names == NAMES  # the ClassLabel ids are the corpus's own

    def part(lo, hi):
        return datasets.Dataset.from_dict({"sentence": tweets.texts[lo:hi], "sentiment": tweets.labels[lo:hi]},
                                          features=features)

    return datasets.DatasetDict(train=part(0, n_train), validation=part(n_train, n_train + n_val))


def _cache_entry(cache, name, config, splits):
    """A dataset in the local datasets cache as a download leaves it: <cache>/<name>/<config>/<version>/
    <hash>/ with dataset_info.json and <name>-<split>.arrow (written by datasets' own Parquet builder)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, table in splits.items():
        files[split] = [str(cache.parent / f"{name}-{split}.parquet")]
        table.to_parquet(files[split][0])
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name=config,
                      data_files=DataFilesDict.from_patterns(files), features=splits["train"].features,
                      hash="0123abcd")
    builder.download_and_prepare()
    # A config defined by the dataset (as on the Hub) has a directory of its bare name; a builder given
    # data files appends their hash.
    made = next(p for p in (cache / name).iterdir() if p.is_dir())
    made.rename(cache / name / config)


# ---- save_to_disk directories


def test_saved_dataset_dict_gives_class_names_and_splits(tmp_path):
    _splits().save_to_disk(str(tmp_path / "saved"))
    train = load_labelled(str(tmp_path / "saved"), text_column="sentence", label_column="sentiment")
    assert train.label_names == NAMES and len(train) == 120
    tweets = load_labelled("tweets")
    assert train.texts == tweets.texts[:120] and train.labels == tweets.labels[:120]
    # a test set's default split is validation; @SPLIT names one
    val = load_labelled(str(tmp_path / "saved"), text_column="sentence", label_column="sentiment",
                        splits=("validation", "test"))
    assert val.texts == tweets.texts[120:168]
    assert load_labelled(f"{tmp_path / 'saved'}@validation", "sentence", "sentiment").texts == val.texts
    with pytest.raises(UserError, match="has no split 'test' .splits: train, validation."):
        load_labelled(f"{tmp_path / 'saved'}@test", "sentence", "sentiment")
    with pytest.raises(UserError, match="has no column 'text'"):
        load_labelled(str(tmp_path / "saved"), label_column="sentiment")


def test_saved_single_dataset_and_unlabelled_rows(tmp_path):
    import datasets

    # GLUE's test splits carry the ClassLabel -1 (no label): such rows are dropped, and all of them is an error
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [-1, -1, -1]},
                               features=features).save_to_disk(str(tmp_path / "test-split"))
    with pytest.raises(UserError, match=r"dropped 3 of 3 rows \(3 without a label\); rows 1, 2, 3: no row is left"):
        load_labelled(str(tmp_path / "test-split"))
    with pytest.raises(UserError, match="holds a single split"):
        load_labelled(f"{tmp_path / 'test-split'}@train")
    # a ClassLabel keeps every name, also of a class with no row
    datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [1, 1, 1, 1]},
                               features=features).save_to_disk(str(tmp_path / "one-class"))
    data = load_labelled(str(tmp_path / "one-class"))
    assert (data.label_names, data.labels) == (["no", "yes"], [1, 1, 1, 1])


# ---- the local datasets cache


def test_cached_dataset_by_name_config_and_split(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    _cache_entry(cache, "tiny_tweets", "sentiment", _splits())
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # a user's online setting does not make it download
    tweets = load_labelled("tweets")
    data = load_labelled("hf:tiny_tweets:sentiment", "sentence", "sentiment")
    assert data.label_names == NAMES and data.texts == tweets.texts[:120]
    val = load_labelled("hf:tiny_tweets:sentiment@validation", "sentence", "sentiment")
    assert val.texts == tweets.texts[120:168]
    assert load_labelled("hf:tiny_tweets", "sentence", "sentiment").texts == data.texts  # the one config
    assert load_public_text("hf:tiny_tweets@validation", text_column="sentence") == val.texts
    with pytest.raises(UserError, match="cached dataset 'nowhere/glue' .config 'qnli'. is not in the local "
                                        "datasets cache .* nothing is downloaded"):
        load_labelled("hf:nowhere/glue:qnli")
    assert datasets.config.HF_HUB_OFFLINE is True
    for bad in ("hf:", "hf:x:", "hf:x@"):
        with pytest.raises(UserError, match=r"is not hf:NAME\[:CONFIG\]\[@SPLIT\]"):
            load_labelled(bad)


@pytest.mark.slow
def test_train_from_a_saved_dataset_and_from_the_cache(tmp_path):
    """The same tweets as a save_to_disk directory and as a cache entry give the same run."""
    splits = _splits(n_train=160, n_val=64)
    splits.save_to_disk(str(tmp_path / "saved"))
    cache = tmp_path / "hf-datasets"
    _cache_entry(cache, "tiny_tweets", "sentiment", splits)
    common = ("--config", "configs/tiny.yaml", "fed.method=fedpetuning", "fed.rounds=1", "data.text_column=sentence",
              "data.label_column=sentiment", "dist.threads_per_rank=1")
    finals = []
    for name, train, test in (("saved", str(tmp_path / "saved"), str(tmp_path / "saved")),
                              ("cached", "hf:tiny_tweets:sentiment", "hf:tiny_tweets:sentiment@validation")):
        run_dir = tmp_path / name
        proc = run_cli("train", *common, f"run.dir={run_dir}", f"data.dataset={train}", f"data.test_file={test}",
                       HF_DATASETS_CACHE=str(cache), timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 1 and 0 <= summary["final_accuracy"] <= 1
        counts = summary["final_predicted_per_class"]
        assert len(counts) == 3 and sum(counts) == 64  # the validation split, three ClassLabel classes
        finals.append(summary["final_accuracy"])
    assert finals[0] == finals[1]


# ---- loud data cleaning


def _csv_with_carriage_returns(path, rows, broken):
    """A CSV whose text column holds a stray carriage return in ``broken`` rows: the parser ends the row
    there, and the row's first half has no label."""
    lines = ["text,label"]
    for i in range(rows):
        text = f"tweet number {i}" + ("\rcontinued" if i in broken else "")
        lines.append(f"{text},{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")


def test_dropped_rows_past_the_threshold_are_an_error(tmp_path):
    path = tmp_path / "cr.csv"
    _csv_with_carriage_returns(path, 300, broken={4, 9, 50, 51, 80, 120, 200})
    with pytest.raises(UserError) as err:
        load_labelled(str(path))
    # each broken row reads as two: 307 rows, of which the 7 first halves have no label
    assert str(err.value) == (f"labelled data file '{path}': dropped 7 of 307 rows (7 without a label); rows 5, "
                              f"11, 53, 55, 85, ...: more than data.max_dropped_fraction = 0.01 of the rows "
                              f"(fix the file, or raise data.max_dropped_fraction)")


def test_dropped_rows_within_the_threshold_are_one_warning(tmp_path, caplog):
    path = tmp_path / "cr.csv"
    _csv_with_carriage_returns(path, 300, broken={10, 20})
    with caplog.at_level(logging.WARNING, logger="fedpft_dist.data.dropped"):
        data = load_labelled(str(path))
    assert len(data) == 300
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedpft_dist.data.dropped"]
    assert warnings == [f"labelled data file '{path}': dropped 2 of 302 rows (2 without a label); rows 11, 22"]
    with pytest.raises(UserError, match="more than data.max_dropped_fraction = 0 of the rows"):
        load_labelled(str(path), max_dropped_fraction=0.0)


def test_the_threshold_is_a_validated_config_key(tmp_path):
    path = tmp_path / "cr.csv"
    _csv_with_carriage_returns(path, 200, broken={3, 7, 11})
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", f"data.dataset={path}",
                   timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "dropped 3 of 203 rows (3 without a label); rows 4, 9, 14" in lines[-1] and "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}",
                   "data.max_dropped_fraction=1.5", timeout=60)
    assert proc.returncode == 2 and "data.max_dropped_fraction" in proc.stderr, proc.stderr[-2000:]


def test_public_text_rows_without_text_warn_and_all_empty_is_an_error(tmp_path, caplog):
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "", "two", None, "three"]))
    with caplog.at_level(logging.WARNING, logger="fedpft_dist.data.dropped"):
        assert load_public_text(str(path)) == ["one", "two", "three"]
    assert [r.getMessage() for r in caplog.records] == [
        f"public text file '{path}': dropped 2 of 5 rows (2 without text); rows 2, 4"]
    path.write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(UserError, match="no row is left"):
        load_public_text(str(path))


def test_a_once_warning_is_printed_by_rank_0_only(capsys):
    from fedpft_dist.runtime import ONCE
    from fedpft_dist.runtime.dist import setup_logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        for rank in (0, 1):
            setup_logging(rank, 2)
            logging.getLogger("fedpft_dist.test").warning("about the data", extra={ONCE: True})
            logging.getLogger("fedpft_dist.test").warning("about this rank")
    finally:
        for h in list(root.handlers):
            if getattr(h, "_fedpft", False):
                root.removeHandler(h)
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    err = capsys.readouterr().err
    assert err.count("about the data") == 1 and "[rank 0/2] WARNING fedpft_dist.test: about the data" in err
    assert err.count("about this rank") == 2
