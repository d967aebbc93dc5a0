"""Proxy construction: every supported family on tiny random configs, the real MiniLM and SmolLM2."""
import json

import pytest
import torch

from conftest import run_cli
from fedpft_dist.models.families import ffn_modules, layout_for, transformer_layers
from fedpft_dist.models.loading import load_model, load_tokenizer, quiet_transformers, resolve_model_dir
from fedpft_dist.models.proxy import (ActivationMoments, activation_moments, activation_saliency_scores, build_proxy,
                                      compensate_proxy, compensated_projection, count_params, hidden_state_errors,
                                      load_proxy, next_token_losses, plan_proxy, save_proxy, select_neurons,
                                      weight_saliency_scores)

quiet_transformers()


def _tiny(model_type: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                  vocab_size=101, max_position_embeddings=64)
    if model_type == "bert":
        return tf.BertModel(tf.BertConfig(**common))
    if model_type == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, num_labels=3, pad_token_id=1))
    if model_type == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=48,
                                                      vocab_size=101, max_position_embeddings=64))
    if model_type in ("llama", "qwen2", "mistral"):
        cfg_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[model_type]
        model_cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
                     "mistral": tf.MistralForCausalLM}[model_type]
        return model_cls(cfg_cls(**common, num_key_value_heads=2, tie_word_embeddings=model_type == "llama"))
    if model_type == "vit":
        return tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=48, image_size=16, patch_size=8, num_channels=3))
    raise AssertionError(model_type)


def _removed_params(fm, plan):
    """Parameters a compressed layer loses: per dropped neuron, one row (+ bias) of every rows
    matrix and one column of every cols matrix."""
    layout = layout_for(fm.config.model_type)
    total = 0
    for l, k in plan.keep.items():
        rows, cols = ffn_modules(transformer_layers(fm)[l], layout)
        per_neuron = sum(m.in_features + (1 if m.bias is not None else 0) for m in rows) + \
            sum(m.out_features for m in cols)
        total += (plan.widths[l] - k) * per_neuron
    return total


def _inputs(fm):
    if fm.config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return {"input_ids": torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))}


FAMILIES = ["bert", "roberta", "distilbert", "llama", "qwen2", "mistral", "vit"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_build_save_reload_every_family(model_type, tmp_path):
    fm = _tiny(model_type).eval()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    plan = plan_proxy(fm, [0, -1], 0.25)
    assert plan.retained == [0, 3] and plan.keep == {1: 12, 2: 12}
    scores = weight_saliency_scores(fm, plan.compressed)
    kept = {l: select_neurons(scores[l], plan.keep[l], torch.Generator().manual_seed(0)) for l in plan.compressed}
    proxy = build_proxy(fm, kept)

    # the FM is untouched; the proxy is smaller by exactly the dropped neurons
    for k, v in fm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert count_params(proxy) == count_params(fm) - _removed_params(fm, plan)

    # kept neurons are the FM's rows/columns, in their original order
    layout = layout_for(fm.config.model_type)
    for l, idx in kept.items():
        f_rows, f_cols = ffn_modules(transformer_layers(fm)[l], layout)
        p_rows, p_cols = ffn_modules(transformer_layers(proxy)[l], layout)
        for fr, pr in zip(f_rows, p_rows):
            assert torch.equal(pr.weight, fr.weight[idx])
        for fc, pc in zip(f_cols, p_cols):
            assert torch.equal(pc.weight, fc.weight[:, idx])

    # save / reload in one call, identical outputs
    task = "causal-lm" if layout.family == "decoder" else "base"
    if model_type == "roberta":
        task = "sequence-classification"
    meta = {"task": task, "kept_indices": {str(l): v for l, v in kept.items()}}
    save_proxy(proxy, None, tmp_path / "proxy", meta)
    cfg = json.loads((tmp_path / "proxy" / "config.json").read_text())
    assert cfg["model_type"] == f"fedpft_{model_type}"
    assert cfg["fedpft_intermediate_sizes"] == [48, 12, 12, 48]
    reloaded, meta2 = load_proxy(tmp_path / "proxy")
    assert meta2["kept_indices"] == meta["kept_indices"]
    assert type(reloaded).__name__ == type(proxy).__name__
    x = _inputs(fm)
    with torch.no_grad():
        a, b = proxy(**x), reloaded(**x)
    first = a.logits if hasattr(a, "logits") else a.last_hidden_state
    second = b.logits if hasattr(b, "logits") else b.last_hidden_state
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_readme_reload_route_runs_as_written(tmp_path):
    """README's Python block on reloading a proxy, run as it is in a fresh interpreter (only its path
    points at a proxy saved here), and the model it loads equals the saved one."""
    import re
    import subprocess

    from conftest import PYTHON, REPO, child_env

    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "AutoModel.from_pretrained" in b]
    assert len(blocks) == 1, "README has one Python block that reloads a proxy"
    fm = _tiny("bert").eval()
    plan = plan_proxy(fm, [0, -1], 0.25)
    proxy = build_proxy(fm, {l: list(range(k)) for l, k in plan.keep.items()})
    save_proxy(proxy, None, tmp_path / "proxy", {"task": "base", "kept_indices": {}})
    code = blocks[0].replace("runs/minilm-proxy/proxy", str(tmp_path / "proxy"))
    code += ("\nimport torch\nx = torch.arange(9).view(1, 9)\n"
             f"torch.save(proxy(input_ids=x).last_hidden_state, {str(tmp_path / 'out.pt')!r})\n")
    proc = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        expected = proxy(input_ids=torch.arange(9).view(1, 9)).last_hidden_state
    # (the child runs one thread, this process more: BLAS sums in another order)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_lora_adapters_move_between_proxy_and_fm(model_type, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    fm = _tiny(model_type).eval()
    plan = plan_proxy(fm, [0, -1], 0.5)
    scores = weight_saliency_scores(fm, plan.compressed)
    proxy = build_proxy(fm, {l: select_neurons(scores[l], plan.keep[l], torch.Generator().manual_seed(0))
                             for l in plan.compressed})
    targets = list(layout_for(fm.config.model_type).attention)
    peft_proxy = get_peft_model(proxy, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_proxy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_proxy.save_pretrained(tmp_path / "adapter")
    on_fm = PeftModel.from_pretrained(_tiny(model_type).eval(), tmp_path / "adapter")
    lora_proxy = {k: v for k, v in peft_proxy.state_dict().items() if "lora_" in k}
    lora_fm = {k: v for k, v in on_fm.state_dict().items() if "lora_" in k}
    assert lora_proxy.keys() == lora_fm.keys() and len(lora_fm) == 4 * 4 * 2
    for k in lora_proxy:
        assert torch.equal(lora_proxy[k], lora_fm[k]), k


def test_select_neurons_breaks_ties_at_random_but_reproducibly():
    scores = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 2.0])
    a = select_neurons(scores, 3, torch.Generator().manual_seed(0))
    b = select_neurons(scores, 3, torch.Generator().manual_seed(0))
    assert a == b and a == sorted(a) and 0 in a and 5 in a
    picks = {tuple(select_neurons(scores, 3, torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(picks) > 1  # the tied neurons are not always the first ones
    with pytest.raises(ValueError):
        select_neurons(scores, 0, torch.Generator())


@pytest.mark.parametrize("kind", ["mean_abs", "apoz"])
def test_activation_saliency(kind):
    fm = _tiny("bert").eval()
    chunks = torch.randint(0, 101, (6, 10), generator=torch.Generator().manual_seed(2))
    scores = activation_saliency_scores(fm, [1, 2], chunks, batch_size=4, kind=kind, eps=1e-3)
    assert set(scores) == {1, 2} and scores[1].shape == (48,)
    assert torch.isfinite(scores[1]).all() and (scores[1] >= 0).all()
    if kind == "apoz":
        assert (scores[1] <= 1).all()
    else:  # mean |a| by hand for layer 1
        acts = []
        layer = transformer_layers(fm)[1]
        h = layer.output.dense.register_forward_pre_hook(lambda m, i: acts.append(i[0].abs()))
        with torch.no_grad():
            fm(input_ids=chunks)
        h.remove()
        torch.testing.assert_close(scores[1], acts[0].reshape(-1, 48).mean(0), rtol=1e-5, atol=1e-6)


def _ffn_outputs(model, layer: int, chunks):
    """The FFN output projection's input and output at ``layer`` over ``chunks``."""
    proj = ffn_modules(transformer_layers(model)[layer], layout_for(model.config.model_type))[1][0]
    seen = []
    h = proj.register_forward_hook(lambda m, i, o: seen.append((i[0].reshape(-1, i[0].shape[-1]),
                                                                  o.reshape(-1, o.shape[-1]))))
    with torch.no_grad():
        model(input_ids=chunks)
    h.remove()
    return torch.cat([a for a, _ in seen]), torch.cat([y for _, y in seen])


@pytest.mark.parametrize("bias", [False, True])
def test_compensated_projection_solves_the_normal_equations(bias):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = a + 0.5                                              # not centred: the bias has work to do
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    moments = ActivationMoments(a.T @ a, a.sum(0), len(a))
    kept = [0, 3, 4, 7, 9]
    y = a @ w.T + (b if bias else 0)
    new_w, new_b = compensated_projection(w, b, moments, kept, ridge=1e-12)
    fit = a[:, kept] @ new_w.T + (new_b if bias else 0)
    # least squares: the residual is orthogonal to every feature (and to the constant, with a bias)
    features = torch.cat([a[:, kept], torch.ones(len(a), 1, dtype=a.dtype)], 1) if bias else a[:, kept]
    assert float((features.T @ (y - fit)).abs().max()) < 1e-6 * float((features.T @ y).abs().max())
    plain = a[:, kept] @ w[:, kept].T + (b if bias else 0)
    assert float((y - fit).pow(2).sum()) < float((y - plain).pow(2).sum())
    # every neuron kept: the projection is the FFN's own
    all_w, all_b = compensated_projection(w, b, moments, range(12), ridge=1e-12)
    torch.testing.assert_close(all_w, w, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(all_b, b, rtol=1e-6, atol=1e-6)
    # a larger ridge shrinks the refitted weights
    assert float(compensated_projection(w, b, moments, kept, ridge=10.0)[0].norm()) < float(new_w.norm())


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_compensation_lowers_each_compressed_ffn_error(model_type):
    fm = _tiny(model_type).eval()
    plan = plan_proxy(fm, [0], 0.25)
    gen = torch.Generator().manual_seed(0)
    kept = {l: select_neurons(s, plan.keep[l], gen) for l, s in weight_saliency_scores(fm, plan.compressed).items()}
    calib = torch.randint(0, 101, (16, 12), generator=torch.Generator().manual_seed(3))
    moments = activation_moments(fm, plan.compressed, calib, batch_size=5)
    assert moments[1].tokens == 16 * 12 and moments[1].gram.shape == (48, 48)
    plain, fitted = build_proxy(fm, kept), build_proxy(fm, kept)
    compensate_proxy(fitted, fm, kept, moments, ridge=1e-6)
    for l in plan.compressed:
        # on the FM's own activations (teacher-forced), the refitted projection is closer to the whole FFN
        a, y = _ffn_outputs(fm, l, calib)
        proj = lambda m: ffn_modules(transformer_layers(m)[l], layout_for(model_type))[1][0]  # noqa: E731
        err = {name: float((proj(m)(a[:, kept[l]]) - y).pow(2).sum()) for name, m in
               (("plain", plain), ("fitted", fitted))}
        assert err["fitted"] < err["plain"], (l, err)
    # the rest of the proxy is untouched
    sp, sf = plain.state_dict(), fitted.state_dict()
    changed = {k for k in sp if not torch.equal(sp[k], sf[k])}
    assert changed and all(".layers." in k or ".layer." in k for k in changed)
    assert all(any(c in k for c in layout_for(model_type).cols) for k in changed)


def test_plan_errors_name_the_key():
    from fedpft_dist.errors import ConfigError

    fm = _tiny("bert")
    with pytest.raises(ConfigError, match="proxy.retained_layers"):
        plan_proxy(fm, [7], 0.25)
    with pytest.raises(ConfigError, match="proxy.keep_ratios"):
        plan_proxy(fm, [0], 0.25, [0.5, 0.5])
    plan = plan_proxy(fm, [0], 0.25, [1.0, 0.5, 0.25, 0.1])
    assert plan.keep == {1: 24, 2: 12, 3: 5}


# --- the real models -----------------------------------------------------------------------------

MINILM_FM_PARAMS = 22_713_216   # BertModel of all-MiniLM-L6-v2, pooler included
MINILM_FFN_NEURON = 384 + 1 + 384  # W_in row + b_in + W_out column
# keep 0.25 of 1536 = 384 neurons in layers 1-4; layers 0 and 5 whole
MINILM_PROXY_PARAMS = MINILM_FM_PARAMS - 4 * (1536 - 384) * MINILM_FFN_NEURON


def test_minilm_proxy_count_reload_and_error(tmp_path):
    proc = run_cli("proxy", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", "proxy.keep_ratio=0.25",
                   "proxy.retained_layers=[0,5]", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "proxy.json").read_text())
    assert report["fm_params"] == MINILM_FM_PARAMS
    assert report["proxy_params"] == MINILM_PROXY_PARAMS == 19_169_664
    assert report["retained_layers"] == [0, 5] and report["compressed_layers"] == [1, 2, 3, 4]
    assert [len(report["kept_indices"][str(l)]) for l in (1, 2, 3, 4)] == [384] * 4
    errors = report["hidden_error_per_layer"]
    assert errors[0] < 1e-10             # layer 0 is whole: identical hidden states
    assert 0 < report["hidden_error_mean"] < 1.0
    assert "hidden-state relative error" in proc.stdout

    proxy, meta = load_proxy(tmp_path / "proxy")
    assert count_params(proxy) == MINILM_PROXY_PARAMS and meta["fm_params"] == MINILM_FM_PARAMS
    # the reloaded proxy reproduces the reported error against the FM
    fm_dir = resolve_model_dir("minilm")
    fm = load_model(fm_dir, "base")
    tok = load_tokenizer(tmp_path / "proxy")
    ids = tok(["It is a truth universally acknowledged, that a single man in possession of a good fortune."],
              return_tensors="pt").input_ids
    err = hidden_state_errors(fm, proxy, ids, batch_size=1)
    assert err[0] < 1e-10 and 0 < err[-1] < 1.0


def test_minilm_compensated_proxy_is_closer_to_the_fm(tmp_path):
    """proxy.compensate with activation saliency (moments from the saliency's own passes): the same
    neurons and parameter count as without it, a lower hidden-state error on held-out text. 64 chunks
    of 64 tokens: the fit has 384 unknowns per output (tiny.yaml's 8 chunks would overfit, and say so)."""
    reports = {}
    for name, extra in (("plain", []), ("fitted", ["proxy.compensate=true"])):
        proc = run_cli("proxy", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / name}",
                       "proxy.saliency=mean_abs", "proxy.calibration_chunks=64", *extra, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "proxy.json").read_text())
    plain, fitted = reports["plain"], reports["fitted"]
    assert fitted["compensated"] is True and plain["compensated"] is False and fitted["compensate_seconds"] > 0
    assert fitted["kept_indices"] == plain["kept_indices"] and fitted["proxy_params"] == plain["proxy_params"]
    for l in fitted["compressed_layers"]:
        assert fitted["hidden_error_per_layer"][l] < plain["hidden_error_per_layer"][l], l
    assert "output projections refitted" in proc.stdout


@pytest.mark.slow
def test_smollm2_proxy_count_reload_and_generation(tmp_path):
    proc = run_cli("proxy", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", "model.path=smollm2",
                   "proxy.keep_ratio=0.5", "proxy.eval_chunks=2", "proxy.sample_tokens=12", timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "proxy.json").read_text())
    assert report["model_type"] == "llama" and report["gated"] is True and report["num_layers"] == 30
    # SwiGLU: a dropped neuron removes a row of W_gate and W_up (576 each) and a column of W_down (576)
    assert report["fm_params"] == 134_515_008
    assert report["proxy_params"] == report["fm_params"] - 28 * (1536 - 768) * 3 * 576
    assert report["sample_proxy"].strip() and any(c.isalpha() for c in report["sample_proxy"])

    proxy, meta = load_proxy(tmp_path / "proxy")
    assert count_params(proxy) == report["proxy_params"]
    # the held-out next-token losses: the FM's below the proxy's, and the reloaded proxy's as reported
    from fedpft_dist.alignment.stages import public_chunks
    from fedpft_dist.config import load_config

    assert 0 < report["held_out_loss_fm"] < report["held_out_loss_proxy"]
    held = public_chunks(load_config(tmp_path / "config.yaml"), load_tokenizer(tmp_path / "proxy"), "held_out", 2)
    assert next_token_losses([proxy], held, 8)[0] == pytest.approx(report["held_out_loss_proxy"], rel=1e-5)
    assert "held-out next-token loss: FM" in proc.stdout
    tok = load_tokenizer(tmp_path / "proxy")
    ids = tok(report["sample_prompt"], return_tensors="pt").input_ids
    out = proxy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == report["sample_proxy"]


# --- construction one layer at a time ------------------------------------------------------------

def _random_decoder_dir(out, layers: int, hidden: int, ffn: int, tie: bool = True):
    """A random LLaMA of SmolLM2's vocabulary and tokenizer, saved as a local HF directory."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                            max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                            pad_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(out)
    load_tokenizer(resolve_model_dir("smollm2")).save_pretrained(out)
    return out


@pytest.mark.parametrize("saliency,compensate", [("mean_abs", True), ("weight", False)])
def test_the_proxy_built_layer_by_layer_is_the_one_the_whole_fm_gives(saliency, compensate, tmp_path):
    """make_proxy reads the FM one layer at a time; the same construction on the whole FM in memory
    (scores, neuron choice, narrowing, refit, errors, losses) gives the same proxy, bit for bit, and
    the same report; a proxy of several files (proxy.max_shard_gb) loads as one."""
    from fedpft_dist.config import load_config
    from fedpft_dist.models.build import make_proxy
    from fedpft_dist.models.proxy import MomentRecorder

    fm_dir = _random_decoder_dir(tmp_path / "fm", layers=5, hidden=32, ffn=96, tie=False)
    cfg = load_config("configs/smollm2-tiny.yaml", [
        f"model.path={fm_dir}", f"proxy.saliency={saliency}", f"proxy.compensate={str(compensate).lower()}",
        "proxy.keep_ratio=0.5", "proxy.batch_size=3", "proxy.sample_tokens=0", "proxy.max_shard_gb=0.002"])
    gen = torch.Generator().manual_seed(1)
    text = {"train": torch.randint(0, 49152, (7, 12), generator=gen), "held_out": torch.randint(0, 49152, (5, 12),
                                                                                                 generator=gen)}
    report = make_proxy(cfg, tmp_path / "proxy", lambda tok, split, n: text[split])
    files = sorted(p.name for p in (tmp_path / "proxy").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "proxy" / "model.safetensors.index.json").is_file()

    fm = load_model(fm_dir, "causal-lm").eval()
    plan = plan_proxy(fm, cfg.proxy.retained_layers, cfg.proxy.keep_ratio)
    if saliency == "weight":
        scores, moments = weight_saliency_scores(fm, plan.compressed), None
    else:
        with MomentRecorder(fm, plan.compressed) as rec:
            scores = activation_saliency_scores(fm, plan.compressed, text["train"], 3, saliency, cfg.proxy.eps)
        moments = rec.moments
    choose = torch.Generator().manual_seed(cfg.run.seed)
    kept = {l: select_neurons(scores[l], plan.keep[l], choose) for l in plan.compressed}
    assert report["kept_indices"] == {str(l): k for l, k in kept.items()}
    expected = build_proxy(fm, kept)
    if compensate:
        compensate_proxy(expected, fm, kept, moments, cfg.proxy.compensate_ridge)
    proxy, meta = load_proxy(tmp_path / "proxy")
    assert meta["kept_indices"] == report["kept_indices"] and meta["fingerprint"]
    theirs = proxy.state_dict()
    for name, value in expected.state_dict().items():
        assert torch.equal(theirs[name], value), name
    assert report["hidden_error_per_layer"] == pytest.approx(hidden_state_errors(fm, expected, text["held_out"], 3),
                                                             rel=1e-6, abs=1e-12)
    assert [report["held_out_loss_fm"], report["held_out_loss_proxy"]] == pytest.approx(
        next_token_losses([fm, expected], text["held_out"], 3), rel=1e-6)
    assert report["fm_bytes_read"] == sum(p.numel() * 4 for p in fm.parameters())


def test_building_a_proxy_holds_one_layer_of_the_fm_not_the_fm(tmp_path):
    """`fedpft proxy` on a 48-layer decoder whose layers dominate: the construction's peak host
    memory stays within the root (embeddings), one layer of the FM and of the proxy, the proxy file
    being filled, one batch's logits with the loss's copies and 24 MB (Python, and library code
    paged in at first use), under half of the FM; the
    generated sample reads the layers as it goes."""
    fm_dir = _random_decoder_dir(tmp_path / "fm", layers=48, hidden=128, ffn=2048)
    proc = run_cli("proxy", "--config", "configs/smollm2-tiny.yaml", f"run.dir={tmp_path / 'run'}",
                   f"model.path={fm_dir}", "run.exact_memory=true", "proxy.max_shard_gb=0.004",
                   "proxy.sample_tokens=2", "proxy.batch_size=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "proxy.json").read_text())
    root = 49152 * 128 * 4
    layer = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 2048)
    fm_bytes = root + 48 * layer
    assert report["fm_bytes_read"] == fm_bytes + 48 * 2 * 128 * 4 + 128 * 4   # and the norms
    peak = report["host_peak_bytes"]
    logits = 3 * 32 * 49152 * 4   # a chunk of 32 tokens: the logits, the loss's fp32 copy and log-softmax
    assert peak <= root + 2 * layer + 4_000_000 + logits + (24 << 20), peak >> 20
    assert peak < fm_bytes / 2, (peak >> 20, fm_bytes >> 20)
    assert report["sample_fm"] and "host memory: peak" in proc.stdout
