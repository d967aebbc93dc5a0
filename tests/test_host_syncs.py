"""A training step waits for nothing: no read of a tensor back to the host (``.item()``, ``.tolist()``,
``float()``, ``int()``, ``bool()``, ``.cpu()``, ...) and no blocking copy to a device (``.to(device)``
without ``non_blocking``: on a GPU it waits for the queued work, a stream synchronisation) in a
client's local-training step (classification and next-token) or in a layer-level distillation step,
so a GPU pipeline is never stalled between steps.

The reads are counted by wrapping the tensor methods that read, and only those that fedpft_dist's own
code makes (the line that calls the method, or Tensor's own Python methods on its behalf, lies in the
package): the libraries' reads are theirs (transformers' mask builders test ``padding_mask.all()``,
DeepSpeed's ZeRO-1/2 optimizer checks the gradient norm, torch's single-tensor AdamW on the CPU reads
its step count; the fused CUDA AdamW that the code builds there does not). Everything is counted on
the CPU, where a read is no wait, so a read shows here whatever the device.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import fedpft_dist
from fedpft_dist.data.tasks import ClientData
from fedpft_dist.federation import client as client_mod
from fedpft_dist.models.adapters import get_adapter, with_lora

LIB = str(Path(fedpft_dist.__file__).resolve().parent)
TENSOR_PY = str(Path(torch.__file__).resolve().parent / "_tensor.py")
# the methods through which Python code reads a tensor's values back to the host
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
# the methods that copy a tensor to a device, blocking unless told ``non_blocking=True``
COPIES = ("to", "cuda")


def _blocking_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``tensor.<name>(*args, **kwargs)`` is a blocking copy to a device (``.to(dtype)`` is none)."""
    if kwargs.get("non_blocking") is True or any(a is True for a in args):
        return False
    return name == "cuda" or "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Inside the block, every read of a tensor (:data:`READS`) and every blocking copy to a device
    (:data:`COPIES`) that fedpft_dist's code makes, as ``"<method> at <file>:<line>"``."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS + COPIES}

    def counting(name, method):
        @functools.wraps(method)
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename == TENSOR_PY:   # e.g. __format__ -> item
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(LIB) and \
                    (name in READS or _blocking_copy(name, args, kwargs)):
                calls.append(f"{name} at {Path(frame.f_code.co_filename).relative_to(LIB)}:{frame.f_lineno}")
            return method(self, *args, **kwargs)
        return read

    own = {name for name in originals if name in vars(torch.Tensor)}   # the others come from torch._C.TensorBase
    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


def test_the_count_sees_the_package_reads_and_only_them():
    t = torch.tensor([1.0, 2.0, 3.0])
    with host_reads() as calls:
        client_mod.perplexity_and_accuracy(t)       # float() of each entry, in the package
        t.sum().item(), float(t[0]), t.tolist()     # the test's own reads: not counted
    assert len(calls) == 3 and all(c.startswith("__float__ at federation/client.py:") for c in calls), calls
    assert not any(name in vars(torch.Tensor) for name in READS + COPIES)   # torch's own methods again
    assert _blocking_copy("to", (torch.device("cpu"),), {}) and _blocking_copy("to", ("cuda", torch.float32), {})
    assert _blocking_copy("cuda", (), {}) and not _blocking_copy("cuda", (), {"non_blocking": True})
    assert not _blocking_copy("to", (torch.float16,), {}) and not _blocking_copy("to", ("cpu",), {"non_blocking": True})


# ----------------------------------------------------------------------------------------------------
# A client's local-training step
# ----------------------------------------------------------------------------------------------------

def _rows(vocab: int, n: int = 6, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of random tokens, of lengths between 3 and ``length``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids * mask, mask


def _tiny_bert_classifier():
    """A 2-layer random BERT of MiniLM's shape family (hidden 32), LoRA on attention, head in full."""
    import transformers as tf

    torch.manual_seed(0)
    fm = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, num_labels=3))
    return with_lora(fm, 4, 8, 0.1, task="sequence-classification")


def _tiny_llama_lm():
    from test_causal_lm import _tiny_llama

    return with_lora(_tiny_llama(2), 4, 8, 0.1, task="causal-lm")


def _client_step_reads(model, data: ClientData, **kw) -> list[str]:
    """The package's reads during two local steps of ``model`` on ``data`` (set-up and plan outside)."""
    local = client_mod._set_up(model, get_adapter(model), 1e-3, 0.01, seed=3, causal=data.labels is None, **kw)
    plan = client_mod._batch_plan(data, 1, 3, torch.Generator().manual_seed(3), local.group, local.sharded)
    assert len(plan) == 2 and min(b.width for b in plan) < data.input_ids.shape[1]   # padding is cut
    with host_reads() as calls:
        totals = [client_mod._train_step(local, data, batch) for batch in plan]
    assert all(t is not None and t.dim() == 0 for t in totals)
    return calls


def test_a_classification_step_reads_nothing_back():
    ids, mask = _rows(128)
    data = ClientData(ids, mask, torch.tensor([0, 1, 2, 0, 1, 2]))
    calls = _client_step_reads(_tiny_bert_classifier(), data, prox_mu=0.1, head_lr_scale=2.0)
    assert calls == [], calls


def test_a_next_token_step_reads_nothing_back():
    ids, mask = _rows(49152)
    calls = _client_step_reads(_tiny_llama_lm(), ClientData(ids, mask, None))
    assert calls == [], calls


def test_the_plan_holds_what_the_steps_read_before():
    """Widths, counts and tokens of the plan: what each step computed from the masks on its own."""
    from fedpft_dist.models.lm import IGNORE, next_token_labels

    ids, mask = _rows(49152, n=7)
    data = ClientData(ids, mask, None)
    gen = torch.Generator().manual_seed(5)
    plan = client_mod._batch_plan(data, 2, 3, gen, None, False)
    again = torch.Generator().manual_seed(5)
    orders = [torch.randperm(7, generator=again) for _ in range(2)]
    batches = [o[s: s + 3] for o in orders for s in range(0, 7, 3)]
    assert [[m.rows.tolist() for m in b.micro] for b in plan] == [[b.tolist()] for b in batches]
    for b, rows in zip(plan, batches):
        width = int(mask[rows].sum(1).max())
        (m,) = b.micro
        assert b.width == width and b.tokens == m.tokens == int(mask[rows].sum()) and m.compute and m.weight == 1.0
        assert b.count == int((next_token_labels(ids[rows, :width], mask[rows, :width])[:, 1:] != IGNORE).sum())


# ----------------------------------------------------------------------------------------------------
# A layer-level distillation step
# ----------------------------------------------------------------------------------------------------

def test_a_distillation_step_reads_nothing_back():
    """Two steps of 2 micro-batches each, every loss term on (weight term, derivative term, adapter
    perturbation), on one rank at ZeRO stage 0."""
    from test_distill_terms import _bert, _proxy

    from fedpft_dist.alignment import job as job_mod
    from fedpft_dist.config import DistillConfig
    from fedpft_dist.runtime import init_runtime

    rt = init_runtime(timeout_s=60, threads_per_rank=torch.get_num_threads(), env={})
    try:
        fm = _bert()
        d = DistillConfig(zero_stage=0, batch_size=4, micro_batch=2, warmup_ratio=0.5)
        run = job_mod.DistillRun(lr=1e-3, alpha=0.01, steps=4, seed=0, progress=False, jvp_weight=1.0,
                                 adapter_noise=0.1)
        chunks = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(0))
        job = job_mod._set_up(rt, fm, _proxy(fm), torch.float32, [1, 2], len(chunks), d, run, [], None)
        with host_reads() as calls:
            steps = [job_mod._distill_step(rt, job, d, run, step, chunks) for step in range(2)]
        assert calls == [], calls
        (lr0, parts0), (lr1, parts1) = steps
        assert lr0 < lr1 and parts0.dtype == torch.float64 and parts0.shape == (len(job_mod.PARTS),)
        on = torch.tensor([k != "lm" for k in job_mod.PARTS])   # every term but the LM term (an emulator's)
        assert bool((parts0[on] > 0).all()) and bool((parts1[on] > 0).all())
        job.perturbation.remove()
    finally:
        rt.shutdown()


def test_models_load_with_sdpa_attention(tmp_path):
    """transformers 5 picks PyTorch's scaled_dot_product_attention for BERT and LLaMA, the FMs' and the
    proxies' classes alike (the fused attention kernels on CUDA)."""
    from test_causal_lm import _tiny_llama
    from test_distill_terms import _bert, _proxy

    from fedpft_dist.models.loading import load_model

    for name, model, task in (("llama", _tiny_llama(2), "causal-lm"), ("bert-proxy", _proxy(_bert()), "base")):
        model.save_pretrained(tmp_path / name)
        assert load_model(tmp_path / name, task).config._attn_implementation == "sdpa", name
