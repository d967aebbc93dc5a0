"""Runs inside `torchrun --nproc-per-node 2`: several distillation jobs on the same proxy, results to JSON.

    python tests/distill_worker.py PROXY_DIR OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fedpft_dist.alignment.distill import plan_neuron_split
from fedpft_dist.alignment.job import DistillRun, run_distillation
from fedpft_dist.config import DistillConfig
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
        student, _ = load_proxy(proxy_dir, task="base")
        d = DistillConfig(zero_stage=stage, batch_size=4, micro_batch=2, warmup_ratio=0.0)
        run = DistillRun(lr=kw.pop("lr", 1e-3), steps=steps, seed=0, eval_batch=4, progress=False, tag=name, **kw)
        r = run_distillation(rt, teacher, student, layers, train, held, d, run)
        # what a plain read of the (possibly partitioned) student gives, next to the gathered result
        raw = {n: p.numel() for n, p in student.named_parameters() if n in r.state}
        return {"losses": r.losses, "before": r.errors_before, "after": r.errors_after,
                "held": r.teacher_bytes_held, "full": r.teacher_bytes_full, "trainable": r.trainable_params,
                "state_numel": {k: v.numel() for k, v in r.state.items()}, "raw_numel": raw}

    # ZeRO stages 0, 2 and 3: the same trajectory
    for stage in (0, 2, 3):
        results[f"stage{stage}"] = job(f"stage{stage}", stage)

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
    r = run_distillation(rt, teacher, student, layers, train, held, d, run, splits)
    # lr = 0, neuron level at ZeRO-3 and layer level at ZeRO-0: what comes back is what went in, bit for bit
    unchanged = {}
    for name, stage, job_splits in (("lr0-neuron", 3, splits), ("lr0-layer", 0, [])):
        st, _ = load_proxy(proxy_dir, task="base")
        ref = {k: v.detach().clone() for k, v in st.state_dict().items()}
        run0 = DistillRun(lr=0.0, steps=2, seed=0, eval_batch=4, progress=False, tag=name)
        r0 = run_distillation(rt, teacher, st, layers, train, held, DistillConfig(zero_stage=stage, batch_size=4,
                              micro_batch=2, warmup_ratio=0.0), run0, job_splits)
        unchanged[name] = {"same": all(torch.equal(v, ref[k]) for k, v in r0.state.items()),
                           "tensors": len(r0.state), "finite": r0.finite}
    if rt.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in r.state.items()}, str(out / "neuron_after.safetensors"))
        save_file({k: v.contiguous() for k, v in before.items() if k in r.state},
                  str(out / "neuron_before.safetensors"))
        results["neuron"] = {"frozen": {str(sp.layer): sp.frozen.tolist() for sp in splits},
                             "trainable": {str(sp.layer): sp.trainable.tolist() for sp in splits},
                             "losses": r.losses, "trainable_params": r.trainable_params}
        results["lr0"] = unchanged
        (out / "results.json").write_text(json.dumps(results))
    rt.comm.barrier()
    rt.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
