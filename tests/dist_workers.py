"""Functions that run inside 2-rank jobs started by the tests (spawned or as scripts)."""
from __future__ import annotations

import collections
import json
import os
import sys
import time

import torch

from fedpft_dist.errors import CollectiveError
from fedpft_dist.runtime import init_runtime


def comm_suite(rank: int, out_dir: str) -> None:
    """Exercise every communicator method; rank r writes what it received to out_dir/rank{r}.json."""
    rt = init_runtime(timeout_s=60, threads_per_rank=1)
    comm = rt.comm
    # Weighted sum as the engine does it: rank 0 has weight 3 (3 samples), rank 1 weight 0.
    weight = [3.0, 0.0][rank]
    theta = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
    mixed = {
        "theta": weight * theta,                                      # float32, 2-D
        "bias": torch.full((5,), weight * (rank + 0.5), dtype=torch.float64),
        "count": torch.tensor([int(weight)], dtype=torch.int64),
        "hits": torch.tensor([[rank + 1, 10 * (rank + 1)]], dtype=torch.int32),
        "half": torch.full((3,), float(rank + 1), dtype=torch.bfloat16),
    }
    summed = comm.all_reduce_sum(mixed)
    state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(11)), "step": torch.tensor([7])} \
        if rank == 0 else None
    got = comm.broadcast_state(state)
    metrics_sum = comm.all_reduce_metrics({"loss": 1.5 * (rank + 1), "n": float(rank)})
    metrics_max = comm.all_reduce_metrics({"t": float(rank + 2)}, op="max")
    agree_min = comm.agree(rank == 0, "min")
    agree_max = comm.agree(rank == 0, "max")
    comm.barrier()
    try:
        comm.all_reduce_sum({"flag": torch.tensor([True])})
        bool_rejected = False
    except TypeError:
        bool_rejected = True
    result = {
        "theta": summed["theta"].tolist(), "theta_dtype": str(summed["theta"].dtype),
        "bias": summed["bias"].tolist(), "bias_dtype": str(summed["bias"].dtype),
        "count": summed["count"].tolist(), "count_dtype": str(summed["count"].dtype),
        "hits": summed["hits"].tolist(), "half": summed["half"].float().tolist(),
        "half_dtype": str(summed["half"].dtype),
        "bcast_w": got["w"].tolist(), "bcast_step": got["step"].tolist(),
        "metrics_sum": metrics_sum, "metrics_max": metrics_max,
        "agree_min": agree_min, "agree_max": agree_max, "bool_rejected": bool_rejected,
        "world_size": rt.world_size, "backend": rt.backend,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    rt.shutdown()


def fault_main(mode: str, timeout_s: float) -> int:
    """Rank 1 leaves mid-job (``exit``: dies; ``hang``: stops answering); rank 0 is inside an
    all-reduce and must end non-zero naming it, as the CLI does."""
    rt = init_runtime(timeout_s=timeout_s, threads_per_rank=1)
    rt.comm.barrier(name="startup")
    if rt.rank == 1:
        if mode == "exit":
            os._exit(17)
        time.sleep(10 * timeout_s + 120)
        return 0
    try:
        rt.comm.all_reduce_sum({"adapter": torch.ones(1000)}, name="aggregate/adapter")
    except CollectiveError as exc:  # what fedpft_dist.cli does
        sys.stderr.write(f"fedpft: error: {exc}\n")
        sys.stderr.flush()
        os._exit(3)
    return 0


if __name__ == "__main__":
    raise SystemExit(fault_main(sys.argv[1], float(sys.argv[2])))


def fake_client_adapter(c: int) -> dict:
    """Client c's "update" in the aggregation tests: seeded tensors; client 4's is NaN."""
    g = torch.Generator().manual_seed(100 + c)
    state = {"a.lora_A.weight": torch.randn(2, 3, generator=g), "head.weight": torch.randn(4, generator=g)}
    if c == 4:
        state["head.weight"] = torch.full((4,), float("nan"))
    return state


def aggregation_suite(rank: int, out_dir: str, aggregation: str, clients_per_rank: list) -> None:
    """Each rank accumulates its clients (client c has c + 1 examples) and joins one reduce; rank r
    writes the mean and counters to out_dir/rank{r}.json."""
    from fedpft_dist.federation.aggregation import make_aggregator
    from fedpft_dist.federation.client import ClientUpdate

    rt = init_runtime(timeout_s=60, threads_per_rank=1)
    agg = make_aggregator(aggregation, fake_client_adapter(0))
    for c in clients_per_rank[rank]:
        upd = ClientUpdate(fake_client_adapter(c), num_samples=c + 1, loss_sum=0.0, steps=1, tokens=0)
        agg.accumulate(upd.adapter, agg.weight(upd))
    red = agg.reduce(rt.comm, {"rider": torch.tensor([float(rank + 1)], dtype=torch.float64)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"mean": {k: v.tolist() for k, v in red.mean.items()}, "excluded": red.excluded,
                   "all_finite": red.all_finite, "total_weight": red.total_weight,
                   "rider": red.extra["rider"].tolist(), "bytes": red.payload_bytes}, fh)
    rt.shutdown()


# ----------------------------------------------------------------------------------------------------
# Client groups: toy clients trained with their batches split over the ranks of a group
# ----------------------------------------------------------------------------------------------------

# a named tuple: FSDP finds the output tensors to hook its backward on by walking the output
_Out = collections.namedtuple("_Out", "logits")


class ToyClassifier(torch.nn.Module):
    def __init__(self, vocab: int = 20, width: int = 8, classes: int = 3):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return _Out(self.head((self.emb(input_ids) * m).sum(1) / m.sum(1)))


class ToyCausalLM(torch.nn.Module):
    def __init__(self, vocab: int = 20, width: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return _Out(self.out(torch.tanh(self.mix(torch.cumsum(h, 1)))))


def toy_client(kind: str, client: int):
    """A toy model (seeded) and one client's data: 13 rows of ragged length, so that batches of 4
    leave a last batch of one row (a rank of a 2-rank group then computes nothing)."""
    from fedpft_dist.data.tasks import ClientData

    g = torch.Generator().manual_seed(100 + client)
    n, length = 13, 7
    ids = torch.randint(0, 20, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = None if kind == "causal" else torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(7)
    model = ToyCausalLM() if kind == "causal" else ToyClassifier()
    return model, ClientData(input_ids=ids * mask, attention_mask=mask, labels=labels, token_type_ids=None)


def toy_train(kind: str, client: int, group=None, prox_mu: float = 0.0, shard: bool = False, grad_accum: int = 1):
    """train_client on a toy client whose adapter is all its parameters; returns the update (and,
    with ``shard``, the model sharded over ``group`` first, the bytes of parameters this rank holds)."""
    from fedpft_dist.federation import client as client_mod
    from fedpft_dist.runtime.shard import assign_full, full_value, local_parameter_bytes, shard_client_model

    model, data = toy_client(kind, client)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    if shard:
        shard_client_model(model, [], group)
        toy_train.local_bytes = local_parameter_bytes(model)
    set_adapter, get_adapter = client_mod.set_adapter, client_mod.get_adapter
    client_mod.set_adapter = lambda m, a: [assign_full(p, a[k]) for k, p in m.named_parameters()]
    client_mod.get_adapter = lambda m: {k: full_value(p.detach()).clone() for k, p in m.named_parameters()}
    try:
        return client_mod.train_client(model, start, data, 2, 4, 0.05, 0.01, seed=3 + client,
                                       prox_mu=prox_mu, group=group, grad_accum=grad_accum)
    finally:
        client_mod.set_adapter, client_mod.get_adapter = set_adapter, get_adapter


# (task, FedProx mu, sharded over the group, fed.grad_accum): with 3 micro-batches of a rank's 2 rows
# of each batch of 4, every rank has an empty micro-batch per step (a stand-in row when sharded)
GROUP_CASES = (("classify", 0.0, False, 1), ("causal", 0.0, False, 1), ("classify", 5.0, False, 1),
               ("classify", 0.0, True, 1), ("causal", 5.0, True, 1), ("classify", 0.0, False, 3),
               ("causal", 0.0, True, 3))


def case_tag(kind: str, mu: float, shard: bool, accum: int) -> str:
    return f"{kind}-{mu:g}" + ("-fsdp" if shard else "") + (f"-accum{accum}" if accum > 1 else "")


def client_groups_suite(rank: int, out_dir: str) -> None:
    """4 ranks as 2 groups of 2: group g trains toy client g (both tasks, and FedProx); every rank
    saves its adapters, loss share and tokens; the groups' own collectives are checked on the way."""
    from safetensors.torch import save_file

    rt = init_runtime(timeout_s=60, threads_per_rank=1)
    groups = rt.client_groups(2)
    own = groups.comm.all_reduce_sum({"x": torch.tensor([float(rank + 1)])})["x"].item()
    sent = groups.comm.broadcast_state({"v": torch.tensor([10.0 * rank])} if groups.leader else None)["v"].item()
    tensors, info = {}, {"rank": rank, "group": groups.index, "group_rank": groups.comm.rank,
                         "count": groups.count, "leader": groups.leader, "group_sum": own, "group_broadcast": sent}
    for kind, mu, shard, accum in GROUP_CASES:
        upd = toy_train(kind, groups.index, groups.comm, mu, shard, accum)
        tag = case_tag(kind, mu, shard, accum)
        if shard:
            info[f"{tag}/local_bytes"] = toy_train.local_bytes
        tensors.update({f"{tag}/{k}": v for k, v in upd.adapter.items()})
        info[tag] = {"loss_sum": upd.loss_sum, "loss_count": upd.loss_count, "tokens": upd.tokens,
                     "steps": upd.steps, "num_samples": upd.num_samples}
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    rt.shutdown()


def _memory(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def sharded_fm_suite(rank: int, out_dir: str, model_dir: str) -> None:
    """The LLaMA-shaped model at ``model_dir`` loaded sharded over the world with LoRA on it: the
    host memory the load took (peak resident bytes over the resident bytes before it), the bytes
    this rank holds, and logits with a random adapter; then the same from the whole model."""
    from pathlib import Path

    from fedpft_dist.models.adapters import get_adapter, set_adapter, with_lora
    from fedpft_dist.models.loading import load_model, load_tokenizer
    from fedpft_dist.models.sharded import load_sharded

    rt = init_runtime(timeout_s=120, threads_per_rank=1)
    md = Path(model_dir)
    pad = load_tokenizer(md).pad_token_id
    wrap = lambda m: with_lora(m, 8, 16, 0.0, task="sequence-classification", ffn_layers=[0])  # noqa: E731
    # the modules a load imports, imported first: the measure is of the model's bytes
    import peft  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    with open("/proc/self/clear_refs", "w") as fh:   # the peak (VmHWM) starts again from the resident bytes
        fh.write("5")
    before = _memory("VmRSS")
    torch.manual_seed(0)
    model, report = load_sharded(md, "sequence-classification", rt.comm, wrap=wrap, num_labels=3, pad_token_id=pad)
    grown = _memory("VmHWM") - before
    torch.manual_seed(0)
    whole = wrap(load_model(md, "sequence-classification", num_labels=3))
    start = get_adapter(whole)   # the new head and LoRA as the whole model starts: the sharded one starts there
    initial_diff = max((v - start[k]).abs().max().item() for k, v in get_adapter(model).items())
    gen = torch.Generator().manual_seed(0)
    adapter = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in get_adapter(whole).items()}
    set_adapter(whole, adapter)
    set_adapter(model, adapter)
    ids = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        sharded, plain = model(input_ids=ids).logits, whole.eval()(input_ids=ids).logits
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters())
                      for layer in whole.get_base_model().model.layers)
    info = {"grown": grown, "held": report["bytes_held"], "read": report["bytes_read"], "zeroed": report["zeroed"],
            "initialised": report["initialised"], "initial_diff": initial_diff,
            "initial_nonzero": sum(int(v.abs().sum() > 0) for v in start.values()),
            "whole": sum(p.numel() * p.element_size() for p in whole.parameters()), "layer": layer_bytes,
            "logits_diff": (sharded - plain).abs().max().item(),
            "adapter_back": max((v - adapter[k]).abs().max().item() for k, v in get_adapter(model).items())}
    # plug-in evaluation over the 4 ranks: 7 test rows in batches of 2 give ranks 0-2 two forward
    # passes and rank 3 one (plus a stand-in); classification, then next-token loss on a causal LM
    from types import SimpleNamespace

    from fedpft_dist.federation.evaluation import evaluate

    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([11, 3, 7, 9, 2, 11, 5])
    mask = (torch.arange(11)[None, :] < lengths[:, None]).long()
    task = SimpleNamespace(test_ids=torch.randint(0, 1000, (7, 11), generator=gen) * mask, test_mask=mask,
                           test_types=None, test_labels=torch.randint(0, 3, (7,), generator=gen), num_classes=3,
                           causal_lm=False)
    info["classify"] = [evaluate(rt, model, task, 2), evaluate(rt, whole, task, 2)]
    del model, whole
    lm_wrap = lambda m: with_lora(m, 8, 16, 0.0, task="causal-lm")  # noqa: E731
    model, _ = load_sharded(md, "causal-lm", rt.comm, wrap=lm_wrap)
    whole = lm_wrap(load_model(md, "causal-lm"))
    adapter = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in get_adapter(whole).items()}
    set_adapter(whole, adapter)
    set_adapter(model, adapter)
    task.causal_lm = True
    info["causal"] = [evaluate(rt, model, task, 2), evaluate(rt, whole, task, 2)]
    # the gradient-fidelity monitor with the sharded model as the FM and the whole one as the client:
    # the same gradients, so cosine 1 and relative error 0
    from fedpft_dist.alignment.fidelity import FidelitySetting, gradient_fidelity
    from fedpft_dist.data.tasks import ClientData

    probe = ClientData(task.test_ids, task.test_mask, None)
    fidelity = gradient_fidelity(rt, whole, model, adapter, lambda a: a, probe, FidelitySetting(True, "layers",
                                                                                                  batch_size=2))
    info["fidelity"] = {k: fidelity[k] for k in ("grad_cosine", "grad_rel_error", "grad_probe_examples")}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(info, fh)
    rt.shutdown()
