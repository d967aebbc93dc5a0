"""configs/paper/*: BERT-base / RoBERTa-base on GLUE, run for one round with tiny random stand-ins of
the same architectures (12 layers, so layers 0 and 11 are retained as in the paper) and GLUE-shaped
parquet files, through the real local-directory loading."""
import json

import pytest

from conftest import REPO, run_cli

pytestmark = [pytest.mark.slow]

TASKS = {"sst2": ("sentence", None, "validation", 2), "qnli": ("question", "sentence", "validation", 2),
         "mnli": ("premise", "hypothesis", "validation_matched", 3), "qqp": ("question1", "question2", "validation", 2)}
WORDS = "the a film plot actor music scene story good bad great dull fine long short funny sad".split()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    import datasets
    import torch
    import transformers as tf

    from fedpft_dist.models.loading import load_tokenizer, resolve_model_dir

    root = tmp_path_factory.mktemp("paper")
    tok = load_tokenizer(resolve_model_dir("minilm"))  # a BERT WordPiece tokenizer, offline
    common = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64,
                  vocab_size=tok.vocab_size, max_position_embeddings=160)
    torch.manual_seed(0)
    for name, model in (("bert-base-uncased", tf.BertModel(tf.BertConfig(**common))),
                        ("roberta-base", tf.RobertaModel(tf.RobertaConfig(**common, pad_token_id=tok.pad_token_id)))):
        model.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    g = torch.Generator().manual_seed(0)

    def sentence():
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist())

    for task, (c1, c2, val, classes) in TASKS.items():
        for split, n in (("train", 48), (val, 16)):
            rows = {c1: [sentence() for _ in range(n)], "label": [i % classes for i in range(n)]}
            if c2:
                rows[c2] = [sentence() for _ in range(n)]
            (root / "glue" / task).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(rows).to_parquet(str(root / "glue" / task / f"{split}.parquet"))
    return root


SHRINK = ["public_text.max_length=32", "proxy.eval_chunks=2", "distill.steps=1", "distill.batch_size=2",
          "distill.micro_batch=2", "distill.max_chunks=16", "distill.eval_chunks=2", "data.max_length=32",
          "fed.num_clients=4", "fed.client_fraction=0.5", "fed.rounds=2", "fed.align_every=1",
          "fed.align_steps=1", "fed.eval_every=2", "fed.checkpoint_every=0", "dist.timeout_s=120"]


# Every task once, the two model families in turn: a config differs from its other-family twin only in
# model.path (test_the_two_families_differ_only_in_the_model checks it), which the runs cover.
RUN = ["bert-sst2", "roberta-qnli", "bert-mnli", "roberta-qqp"]


def test_the_two_families_differ_only_in_the_model():
    from fedpft_dist.config import config_to_dict, load_config

    for t in TASKS:
        bert, roberta = (config_to_dict(load_config(REPO / "configs" / "paper" / f"{m}-{t}.yaml"))
                         for m in ("bert", "roberta"))
        assert bert["model"].pop("path") != roberta["model"].pop("path")
        assert bert["run"].pop("dir") != roberta["run"].pop("dir")
        assert bert == roberta, t


def test_every_task_shares_the_papers_setting():
    from fedpft_dist.config import load_config

    base = load_config(REPO / "configs" / "paper" / "base.yaml")
    for path in sorted((REPO / "configs" / "paper").glob("*-*.yaml")):
        cfg = load_config(path)
        assert (cfg.fed, cfg.proxy, cfg.distill) == (base.fed, base.proxy, base.distill), path.name
        assert cfg.data.max_length == base.data.max_length and cfg.public_text == base.public_text


@pytest.mark.parametrize("name", RUN)
def test_paper_config_runs_one_round(name, roots, tmp_path):
    proc = run_cli("train", "--config", f"configs/paper/{name}.yaml", f"run.dir={tmp_path}", *SHRINK, timeout=600,
                   FEDPFT_MODELS=str(roots / "models"), FEDPFT_GLUE=str(roots / "glue"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # round 1 aligns (round 2, the last, does not); round 2 evaluates and measures gradient fidelity
    assert summary["method"] == "fedpft" and summary["rounds"] == 2 and summary["alignment_rounds"] == 1
    assert summary["final_accuracy"] is not None and summary["final_grad_cosine"] is not None
    proxy = json.loads((tmp_path / "proxy" / "fedpft_proxy.json").read_text())
    assert proxy["retained_layers"] == [0, 11] and proxy["proxy_ffn_widths"][5] == 16  # 0.25 x 64
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test_examples"] == 16


def test_unset_data_root_is_a_user_error(tmp_path):
    proc = run_cli("train", "--config", "configs/paper/bert-sst2.yaml", f"run.dir={tmp_path}", timeout=120,
                   FEDPFT_MODELS=str(REPO))
    assert proc.returncode == 2
    assert "environment variable" in proc.stderr or "model directory not found" in proc.stderr
