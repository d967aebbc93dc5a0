import json

import pytest
import torch

from fedpft_dist.data import load_public_text, shard, split_held_out, token_chunks
from fedpft_dist.data.public import AUSTEN_FILES
from fedpft_dist.errors import UserError

PARAGRAPHS = ["First paragraph,\nwrapped over two lines.", "Second one.", "Third and last."]


@pytest.fixture(scope="module")
def austen() -> list[str]:
    return load_public_text("austen")


class WordTokenizer:
    """A GPT-like tokenizer stand-in: one id per word, an eos token, no cls/sep."""

    cls_token_id = None
    sep_token_id = None
    eos_token_id = 0

    def __init__(self):
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        assert not add_special_tokens
        self.calls += 1
        return {"input_ids": [len(w) for w in text.split()]}


# ---- built-in corpus


def test_builtin_corpus_has_six_novels(austen):
    assert len(AUSTEN_FILES) == 6
    assert sum(len(d.encode("utf-8")) for d in austen) > 3_000_000
    titles = {"SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY",
              "PERSUASION"}
    assert titles <= {d.upper() for d in austen}
    first = next(i for i, d in enumerate(austen) if d.startswith("It is a truth universally acknowledged"))
    assert "single man in possession of a good fortune" in austen[first]
    # Paragraphs are whole: no hard-wrapped lines and no empty documents.
    assert all(d and "\n" not in d for d in austen)


def test_builtin_corpus_order_is_fixed(austen):
    assert load_public_text() == austen
    assert austen[0].upper() == "SENSE AND SENSIBILITY"


# ---- local sources


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(PARAGRAPHS[:2]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\r\n  \r\n" + PARAGRAPHS[2] + "\r\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_public_text(str(tmp_path / "a.txt")) == PARAGRAPHS[:2]
    assert load_public_text(str(tmp_path)) == PARAGRAPHS


def test_table_sources(tmp_path):
    rows = [{"id": i, "body": p} for i, p in enumerate(PARAGRAPHS)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_public_text(str(jsonl), text_column="body") == PARAGRAPHS

    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    table = pa.table({"id": list(range(3)), "text": PARAGRAPHS})
    pyarrow.csv.write_csv(table, tmp_path / "t.csv")
    pyarrow.parquet.write_table(table, tmp_path / "t.parquet")
    assert load_public_text(str(tmp_path / "t.csv")) == PARAGRAPHS
    assert load_public_text(str(tmp_path / "t.parquet")) == PARAGRAPHS


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_public_text(str(tmp_path / "missing.txt"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unknown extension"):
        load_public_text(str(tmp_path / "data.xml"))

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_public_text(str(jsonl), text_column="content")
    message = str(err.value)
    assert "'content'" in message and "t.jsonl" in message and "body, id" in message
    assert "\n" not in message
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UserError, match="could not read .*bad.jsonl.*: line 2 is not JSON"):
        load_public_text(str(tmp_path / "bad.jsonl"))

    (tmp_path / "blank.txt").write_text(" \n\n \n")
    with pytest.raises(UserError, match="contains no text"):
        load_public_text(str(tmp_path / "blank.txt"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        load_public_text(str(empty_dir))


# ---- splitting


def test_split_held_out_is_deterministic_disjoint_and_covering():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_held_out(docs, 0.2, seed=3)
    assert (train, held) == split_held_out(docs, 0.2, seed=3)
    assert len(held) == 10
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
    # Each part keeps the input order.
    assert train == sorted(train, key=docs.index) and held == sorted(held, key=docs.index)
    assert split_held_out(docs, 0.2, seed=4)[1] != held


def test_split_held_out_edge_cases():
    assert split_held_out(["a", "b"], 0.01, seed=0)[1] != []
    assert len(split_held_out(["a", "b"], 0.99, seed=0)[0]) == 1
    assert split_held_out(["a"], 0.5, seed=0) == (["a"], [])
    assert split_held_out(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    with pytest.raises(ValueError):
        split_held_out(["a", "b"], 1.0, seed=0)


def test_shard():
    items = list(range(10))
    assert shard(items, 0, 3) == [0, 3, 6, 9]
    assert shard(items, 2, 3) == [2, 5, 8]
    assert sorted(x for r in range(3) for x in shard(items, r, 3)) == items
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError):
        shard(items, 3, 3)


# ---- token chunks


def test_token_chunks_exact_count_with_eos_joiner():
    tok = WordTokenizer()
    # Words of lengths 1..3 and 4..5, joined by eos (0): stream [1, 2, 3, 0, 4, 5] -> 3 chunks of 2.
    chunks = token_chunks(tok, ["a bb ccc", "dddd eeeee"], max_length=2)
    assert chunks.dtype == torch.long
    assert chunks.tolist() == [[1, 2], [3, 0], [4, 5]]
    assert token_chunks(tok, ["a bb ccc", "dddd eeeee"], max_length=4).tolist() == [[1, 2, 3, 0]]
    assert token_chunks(tok, ["a"], max_length=4).shape == (0, 4)


def test_token_chunks_stops_tokenising_at_max_chunks():
    tok = WordTokenizer()
    docs = ["w " * 10] * 100
    chunks = token_chunks(tok, docs, max_length=8, max_chunks=2)
    assert chunks.shape == (2, 8)
    assert tok.calls == 2  # 2 documents give 21 tokens >= 2 * 8


def test_token_chunks_wraps_cls_sep_for_bert(minilm):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    n_tokens = len(minilm(text, add_special_tokens=False)["input_ids"])
    chunks = token_chunks(minilm, [text], max_length=6)
    assert chunks.shape == (n_tokens // 4, 6)
    assert (chunks[:, 0] == minilm.cls_token_id).all() and (chunks[:, -1] == minilm.sep_token_id).all()
    assert minilm.decode(chunks[0, 1:-1]) == "it is a truth"
    # Documents are joined by [SEP] inside a chunk.
    joined = token_chunks(minilm, ["emma", "harriet"], max_length=5)
    assert minilm.convert_ids_to_tokens(joined[0].tolist()) == ["[CLS]", "emma", "[SEP]", "harriet", "[SEP]"]


def test_token_chunks_of_builtin_corpus(minilm, austen):
    chunks = token_chunks(minilm, austen, max_length=128, max_chunks=8)
    assert chunks.shape == (8, 128)
    assert torch.equal(chunks, token_chunks(minilm, austen[:200], max_length=128, max_chunks=8))
    assert int(chunks.max()) < minilm.vocab_size


def test_a_too_short_public_text_names_its_source(tmp_path):
    from fedpft_dist.config import load_config
    from fedpft_dist.data.public import public_chunks

    short = tmp_path / "short.txt"
    short.write_text("A few words.\n\nAnd a few more.\n")
    cfg = load_config("configs/tiny.yaml", [f"public_text.source={short}"])
    with pytest.raises(UserError, match=f"public_text.source '{short}' is too short: its held-out"):
        public_chunks(cfg, WordTokenizer(), "held_out", 4)
