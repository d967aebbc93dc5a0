"""Runs inside `torchrun --nproc-per-node 2`: several distillation jobs on the same proxy, results to JSON.

    python tests/distill_worker.py PROXY_DIR OUT_DIR
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from fedpft_dist.alignment import zero
from fedpft_dist.alignment.distill import plan_neuron_split
from fedpft_dist.alignment.job import DistillRun, run_distillation
from fedpft_dist.config import DistillConfig
from fedpft_dist.data.tasks import CLASSIFICATION
from fedpft_dist.environment import prepare_process
from fedpft_dist.data.public import load_public_text, split_held_out, token_chunks
from fedpft_dist.models.loading import load_model, load_tokenizer, resolve_model_dir
from fedpft_dist.models.proxy import load_proxy, read_proxy_meta
from fedpft_dist.runtime import init_runtime


def main(proxy_dir: str, out_dir: str) -> None:
    prepare_process()
    rt = init_runtime(timeout_s=300, threads_per_rank=1)
    out = Path(out_dir)
    meta = read_proxy_meta(proxy_dir)
    layers = meta["compressed_layers"]
    fm_dir = resolve_model_dir("minilm")
    tok = load_tokenizer(Path(proxy_dir))
    train_docs, held_docs = split_held_out(load_public_text("austen"), 0.05, 0)
    train = token_chunks(tok, train_docs, 32, 48)
    held = token_chunks(tok, held_docs, 32, 8)
    teacher = lambda: load_model(fm_dir, "base")  # noqa: E731
    results = {}

    def job(name: str, stage: int, steps: int = 4, **kw) -> dict:
        loaded, at_load = [], []

        def student():   # loaded by the job, as fedpft distill does: partitioned as it loads at ZeRO-3
            loaded.append(load_proxy(proxy_dir, task="base")[0])
            at_load.append(zero.held_bytes(loaded[-1])[0])   # before DeepSpeed's engine exists
            return loaded[-1]

        d = DistillConfig(zero_stage=stage, batch_size=4, micro_batch=2, warmup_ratio=0.0)
        run = DistillRun(lr=kw.pop("lr", 1e-3), steps=steps, seed=0, eval_batch=4, progress=False, tag=name, **kw)
        r = run_distillation(rt, teacher, student, layers, train, held, d, run, student_dtype=torch.float32)
        # what a plain read of the (possibly partitioned) student gives, next to the gathered result
        raw = {n: p.numel() for n, p in loaded[0].named_parameters() if n in r.state}
        return {"losses": r.losses, "before": r.errors_before, "after": r.errors_after,
                "held": r.teacher_bytes_held, "full": r.teacher_bytes_full, "trainable": r.trainable_params,
                "student_held": r.student_bytes_held, "student_held_at_load": at_load[0], "student_full": r.student_bytes_full,
                "state_numel": {k: v.numel() for k, v in r.state.items()}, "raw_numel": raw}

    # ZeRO stages 0, 2 and 3: the same trajectory
    # stage 3 also writes the step log and reads the loss terms mid-job (after step 3 of 4): a read is a
    # collective that every rank makes, though only rank 0 writes the file
    for stage in (0, 2, 3):
        logged = {"log_path": str(out / "stage3_log.jsonl"), "log_every": 3} if stage == 3 else {}
        results[f"stage{stage}"] = job(f"stage{stage}", stage, **logged)

    # adapter perturbation and the derivative term: hooks and extra FFN forwards under ZeRO-3 too
    for stage in (0, 3):
        results[f"terms{stage}"] = job(f"terms{stage}", stage, steps=2, adapter_noise=0.5, jvp_weight=1.0)

    # checkpoint at step 2 of 4, then a fresh job resumes from it
    ckpt = out / "ckpt"
    results["full_run"] = job("ckpt-full", 3, checkpoint_every=2, checkpoint_dir=str(ckpt))
    results["resumed"] = job("ckpt-resume", 3, checkpoint_dir=str(ckpt), resume=True)

    # neuron level: the most active half of each layer frozen
    gen = torch.Generator().manual_seed(0)
    activity = {l: torch.rand(len(meta["kept_indices"][str(l)]), generator=torch.Generator().manual_seed(l))
                for l in layers}
    splits = [plan_neuron_split(activity[l], 0.5, gen, l) for l in layers]
    student, _ = load_proxy(proxy_dir, task="base")
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    d = DistillConfig(zero_stage=3, batch_size=4, micro_batch=2, warmup_ratio=0.0)
    run = DistillRun(lr=1e-2, steps=3, seed=0, eval_batch=4, progress=False, tag="neuron")
    neuron_at_load = []

    def neuron_student():   # as an alignment round loads it: partitioned as it loads, split Linear by Linear
        m = load_proxy(proxy_dir, task="base")[0]
        neuron_at_load.append(zero.held_bytes(m))
        return m

    r = run_distillation(rt, teacher, neuron_student, layers, train, held, d, run, splits, student_dtype=torch.float32)
    # lr = 0, neuron level at ZeRO-3 and layer level at ZeRO-0: what comes back is what went in, bit for bit
    unchanged = {}
    for name, stage, job_splits in (("lr0-neuron", 3, splits), ("lr0-layer", 0, [])):
        st, _ = load_proxy(proxy_dir, task="base")
        ref = {k: v.detach().clone() for k, v in st.state_dict().items()}
        run0 = DistillRun(lr=0.0, steps=2, seed=0, eval_batch=4, progress=False, tag=name)
        loader = (lambda: load_proxy(proxy_dir, task="base")[0]) if job_splits else st   # noqa: E731
        # at ZeRO-3 the tensors are handed over a layer at a time, as an alignment round takes them
        parts: list[dict] = []
        r0 = run_distillation(rt, teacher, loader, layers, train, held, DistillConfig(zero_stage=stage, batch_size=4,
                              micro_batch=2, warmup_ratio=0.0), run0, job_splits, student_dtype=torch.float32,
                              sink=parts.append if stage == 3 else None)
        state = {k: v for part in parts for k, v in part.items()} if stage == 3 else r0.state
        unchanged[name] = {"same": all(torch.equal(v, ref[k]) for k, v in state.items()),
                           "tensors": len(state), "finite": r0.finite, "state_left": len(r0.state),
                           "bytes": r0.state_bytes == sum(v.numel() * 4 for v in state.values()),
                           "parts": [sorted({int(re.search(r"\.(\d+)\.", k).group(1)) for k in part}) for part in parts]}
    results["lent_teacher"] = lent_teacher(rt, proxy_dir, fm_dir, layers, train, held, splits)
    # every job's engine, optimizer and models are gone once nothing of ours refers to them
    import gc

    del st, student
    gc.collect()
    results["alive"] = sorted(type(o).__name__ for o in gc.get_objects()
                              if type(o).__name__ in ("DeepSpeedEngine", "DeepSpeedZeroOptimizer_Stage3", "DistillPair"))
    if rt.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in r.state.items()}, str(out / "neuron_after.safetensors"))
        save_file({k: v.contiguous() for k, v in before.items() if k in r.state},
                  str(out / "neuron_before.safetensors"))
        results["neuron"] = {"frozen": {str(sp.layer): sp.frozen.tolist() for sp in splits},
                             "trainable": {str(sp.layer): sp.trainable.tolist() for sp in splits},
                             "losses": r.losses, "trainable_params": r.trainable_params,
                             "held_at_load": list(neuron_at_load[0]), "student_held": r.student_bytes_held,
                             "student_full": r.student_bytes_full}
        results["lr0"] = unchanged
        (out / "results.json").write_text(json.dumps(results))
    rt.comm.barrier()
    rt.shutdown()


def lent_teacher(rt, proxy_dir, fm_dir, layers, train, held, splits) -> dict:
    """A neuron-level job (ZeRO-0) against an FM held in memory with a LoRA adapter plugged in, and the
    same job against the FM loaded with that adapter merged into its weights."""
    from fedpft_dist.models.adapters import get_adapter, merge_lora_into, set_adapter, with_lora

    fm = with_lora(load_model(fm_dir, CLASSIFICATION, num_labels=3), 8, 16, 0.1)   # as the engine holds it
    adapter = get_adapter(fm)
    gen = torch.Generator().manual_seed(3)
    adapter = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in adapter.items()}
    set_adapter(fm, adapter)
    prefix = fm.get_base_model().base_model_prefix
    flags = {n: p.requires_grad for n, p in fm.named_parameters()}
    ids = held[:2]
    with torch.no_grad():
        fm.eval()
        out_before = fm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    fm.train()

    def merged():
        m = load_model(fm_dir, "base")
        merge_lora_into(m, adapter, 16 / 8, strip=[prefix])
        return m

    d = DistillConfig(zero_stage=0, batch_size=4, micro_batch=2, warmup_ratio=0.0)
    states = []
    for teacher in (fm.get_base_model().base_model, merged):
        st, _ = load_proxy(proxy_dir, task="base")
        run = DistillRun(lr=1e-2, steps=3, seed=0, eval_batch=4, progress=False, tag="lent")
        states.append(run_distillation(rt, teacher, st, layers, train, held, d, run, splits).state)
    modes_kept = all(m.training for m in fm.modules())
    with torch.no_grad():
        fm.eval()
        out_after = fm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    start, _ = load_proxy(proxy_dir, task="base")
    start = start.state_dict()
    diff = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
    moved = max(float((states[1][k] - start[k]).abs().max()) for k in states[1])
    with torch.no_grad():
        lent = fm.get_base_model().base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        plain = merged()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    hidden = float((lent - plain).norm() / plain.norm())
    return {"max_state_diff": diff, "max_moved": moved, "hidden_rel_diff": hidden,
            "keys_match": sorted(states[0]) == sorted(states[1]),
            "flags_kept": flags == {n: p.requires_grad for n, p in fm.named_parameters()}, "modes_kept": modes_kept,
            "any_trainable": any(flags.values()), "output_kept": bool(torch.equal(out_before, out_after)),
            "merged_modules": merge_lora_into(load_model(fm_dir, "base"), adapter, 1.0, strip=[prefix])}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
