"""The GPU check's own measurements and its summary (scripts/gpu-check.sh runs each as one phase).

    python scripts/gpu_check.py probe OUT.json
    python scripts/gpu_check.py client-step OUT.json --model-config CONFIG.json --plan-config CONFIG.yaml
    python scripts/gpu_check.py same-weights A_DIR B_DIR OUT.json
    python scripts/gpu_check.py summary WORKDIR OUTDIR

``probe``: versions and the APIs the GPU path relies on, each tried on the device (fused AdamW, SDPA in
bf16, NCCL, DeepSpeed's CUDA accelerator, FSDP2, peft LoRA on a bf16 layer, the Triton driver,
a LLaMA block with SDPA attention).

``client-step``: one client's LoRA step on the FedPFT proxy of a decoder given by its config.json
(random weights built on the device in bf16, token ids drawn at random: nothing to download), at
each batch x length of ``--shapes``, with and without activation checkpointing: tokens/s, achieved
TFLOP/s and model FLOPs utilisation, and the peak memory measured against ``fedpft memory-plan``'s
client-training figure for the same setting. FLOPs per token follow the usual convention,
6 N + 12 L h s (N parameters of the client model, L layers, h width, s tokens), although a LoRA step
computes no gradient for the frozen weights (about 4 N executed, 6 N with checkpointing).

``same-weights``: whether two distillation runs left the same distilled proxy, bit for bit.

``summary``: gathers every phase's record and JSON into OUTDIR/gpu-check.json and prints the table.
Everything also runs on the CPU (``--device cpu``), which is how the tests check the code.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# bf16 dense peak of the chips a GPU check meets (TFLOP/s, spec sheets); others report no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}


def _write(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def _version(name: str):
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _try(fn, skip: str | None = None) -> dict:
    if skip:
        return {"ok": None, "skipped": skip}
    t0 = time.perf_counter()
    try:
        detail = fn()
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 3), **({"detail": detail} if detail else {})}
    except Exception as exc:  # a probe reports what failed; the check goes on
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "traceback": traceback.format_exc()[-2000:]}


# ----------------------------------------------------------------------------------------------------
# probe

def probe(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    bf16 = torch.bfloat16
    out: dict = {"device": str(device), "python": platform.python_version(),
                 "versions": {n: _version(n) for n in ("torch", "transformers", "peft", "accelerate", "deepspeed",
                                                        "triton", "safetensors", "pydantic", "mpi4py", "numpy")},
                 "torch_cuda": torch.version.cuda, "probes": {}}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 1e9, 1), multiprocessors=props.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
    p = out["probes"]

    def fused_adamw():
        w = torch.nn.Parameter(torch.randn(64, 64, device=device))
        opt = torch.optim.AdamW([w], lr=1e-3, fused=cuda)
        w.grad = torch.ones_like(w)
        opt.step()
        return {"fused": cuda}
    p["adamw"] = _try(fused_adamw)

    def sdpa():
        q = torch.randn(2, 8, 128, 64, device=device, dtype=bf16 if cuda else torch.float32)
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert torch.isfinite(o.float()).all()
    p["sdpa"] = _try(sdpa)

    def nccl():
        import torch.distributed as dist  # a probe of the installed build, outside any job

        if not dist.is_nccl_available():
            raise RuntimeError("torch.distributed reports no NCCL")
        return {"nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}
    p["nccl"] = _try(nccl, None if cuda else "NCCL runs on CUDA only")

    def deepspeed_accelerator():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if cuda and name != "cuda":
            raise RuntimeError(f"DeepSpeed's accelerator is {name!r}, not cuda (DS_ACCELERATOR set?)")
        return {"accelerator": name, "deepspeed": deepspeed.__version__}
    p["deepspeed"] = _try(deepspeed_accelerator)

    def fsdp2():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    p["fsdp2"] = _try(fsdp2)

    def lora_bf16():
        from peft import LoraConfig, get_peft_model

        m = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(device=device, dtype=bf16)
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
        x = torch.randn(8, 64, device=device, dtype=bf16)
        pm(x).float().sum().backward()
        dtypes = sorted({str(q.dtype).replace("torch.", "") for q in pm.parameters() if q.requires_grad})
        return {"lora_dtypes": dtypes}
    p["peft_lora_bf16"] = _try(lora_bf16)

    def triton_driver():
        from fedpft_kernels.backend import triton_status

        status = triton_status()
        if cuda and not status.get("driver"):
            raise RuntimeError(f"no active Triton driver: {status.get('error')}")
        return {k: status.get(k) for k in ("installed", "version", "driver", "error")}
    p["triton"] = _try(triton_driver)

    def llama_sdpa():
        from fedpft_dist.models.random_init import random_model

        cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
        m = random_model(cfg, dtype=bf16 if cuda else torch.float32, device=device, attn_implementation="sdpa")
        ids = torch.randint(0, 256, (2, 32), device=device)
        m(input_ids=ids, labels=ids).loss.backward()
        return {"attn_implementation": m.config._attn_implementation}
    p["llama_sdpa"] = _try(llama_sdpa)
    out["ok"] = all(v["ok"] is not False for v in p.values())
    return out


# ----------------------------------------------------------------------------------------------------
# one client's LoRA step on a decoder's proxy

def _plan_client_bytes(plan_config: str, model_config: dict, batch: int, length: int) -> dict:
    from transformers import AutoConfig

    from fedpft_dist.commands.memory_plan import memory_plan
    from fedpft_dist.config import load_config

    cfg = load_config(plan_config, [f"fed.batch_size={batch}", f"data.max_length={length}", "model.dtype=bfloat16"])
    raw = dict(model_config)
    plan = memory_plan(cfg, AutoConfig.for_model(raw.pop("model_type"), **raw), 1)
    return {"plan": plan["totals"]["client_training"], "counts": plan["counts"], "cfg": cfg}


def client_step(model_config_path: str, plan_config: str, shapes: list[tuple[int, int]], device: torch.device,
                dtype: torch.dtype, steps: int, warmup: int, peak_tflops: float | None) -> dict:
    import transformers

    from fedpft_dist.models.adapters import with_lora
    from fedpft_dist.models.compat import activation_checkpointing
    from fedpft_dist.models.families import transformer_layers
    from fedpft_dist.models.proxy import plan_proxy
    from fedpft_dist.models.proxy_arch import proxy_class_for, proxy_config_from
    from fedpft_dist.models.random_init import read_config

    model_config = read_config(Path(model_config_path).parent, "--model-config")
    first = _plan_client_bytes(plan_config, model_config, *shapes[0])
    cfg, counts = first["cfg"], first["counts"]
    raw = dict(model_config)
    fm_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    fm_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        fm_meta = transformers.AutoModelForCausalLM.from_config(fm_config)
        plan = plan_proxy(fm_meta, cfg.proxy.retained_layers or None, cfg.proxy.keep_ratio)
    sizes = [plan.keep.get(l, w) for l, w in enumerate(plan.widths)]
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            proxy = proxy_class_for(fm_meta)(proxy_config_from(fm_config, sizes))
    finally:
        torch.set_default_dtype(default)
    proxy.config._attn_implementation = "sdpa"
    build_s = time.perf_counter() - t0
    f = cfg.fed
    model = with_lora(proxy, f.lora_r, f.lora_alpha, f.lora_dropout, "causal-lm", ffn_layers=counts["lora_ffn_layers"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    layers = len(transformer_layers(proxy))
    h = fm_config.hidden_size
    vocab = fm_config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    peak = peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "client_params": n_params,
           "trainable_params": sum(p.numel() for p in trainable), "layers": layers, "build_s": round(build_s, 2),
           "lora_ffn_layers": counts["lora_ffn_layers"], "peak_tflops": peak, "steps": steps, "warmup": warmup,
           "cases": []}
    model.train()
    for batch, length in shapes:
        planned = _plan_client_bytes(plan_config, model_config, batch, length)["plan"] if (batch, length) != shapes[0] \
            else first["plan"]
        ids = torch.randint(0, vocab, (batch, length), device=device, generator=gen)
        for ckpt in (False, True):
            activation_checkpointing(model, ckpt)
            case = {"batch": batch, "length": length, "tokens": batch * length, "checkpointing": ckpt}
            try:
                opt.zero_grad(set_to_none=True)
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for i in range(warmup + steps):
                    _sync(device)
                    t = time.perf_counter()
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    _sync(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t)
                step_s = statistics.median(times)
                tok_s = batch * length / step_s
                flops_per_token = 6 * n_params + 12 * layers * h * length
                achieved = flops_per_token * tok_s / 1e12
                key = "client model, with checkpointing" if ckpt else "client model, without checkpointing"
                case.update(step_s=step_s, tokens_per_s=tok_s, tflops=achieved,
                            mfu=achieved / peak if peak else None, loss=float(loss.detach()),
                            planned_bytes=planned[key])
                if device.type == "cuda":
                    measured = torch.cuda.max_memory_allocated(device)
                    case.update(peak_bytes=measured, measured_over_planned=measured / planned[key])
            except torch.cuda.OutOfMemoryError as exc:
                case.update(error=f"out of memory: {str(exc).splitlines()[0]}")
            finally:
                activation_checkpointing(model, False)
            out["cases"].append(case)
            print(json.dumps({k: case.get(k) for k in ("batch", "length", "checkpointing", "tokens_per_s", "mfu",
                                                       "peak_bytes", "planned_bytes", "error")}), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# the resumed distillation against the uninterrupted one

def same_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if not fa or [p.name for p in fa] != [p.name for p in fb]:
        return {"equal": False, "why": f"weight files differ: {[p.name for p in fa]} vs {[p.name for p in fb]}"}
    differing, total = [], 0
    for pa, pb in zip(fa, fb):
        ta, tb = load_file(str(pa)), load_file(str(pb))
        if ta.keys() != tb.keys():
            return {"equal": False, "why": f"{pa.name}: tensor names differ"}
        total += len(ta)
        differing += [k for k in ta if not torch.equal(ta[k], tb[k])]
    return {"equal": not differing, "tensors": total, "differing": differing[:20]}


# ----------------------------------------------------------------------------------------------------
# summary

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _distill_line(d: dict) -> str:
    if not d:
        return ""
    mem = d.get("peak_memory_mb_per_rank")
    return (f"steps {d.get('steps')}, {_fmt(d.get('step_seconds_median'))} s/step, loss {_fmt(d.get('loss_first'))} -> "
            f"{_fmt(d.get('loss_last'))}, peak {_fmt(max(mem) if isinstance(mem, list) and mem else mem)} MB")


def plan_against_peak(bench: dict, plan: dict) -> dict:
    """The run's measured peak (device memory on a GPU) against the plan's largest phase of
    ``fedpft train`` with the FM resident (client training, alignment, evaluation), in bytes."""
    totals = plan.get("totals", {})
    phases = {"client_training": "fedpft train (client model + resident FM), without checkpointing",
              "alignment": "steady + the engine's client model and FM",
              "evaluation": "FM, client model and activations"}
    planned = {k: totals.get(k, {}).get(v) for k, v in phases.items()}
    planned = {k: v for k, v in planned.items() if v is not None}
    peak_mb = max(bench.get("peak_memory_mb_per_rank") or [0.0])
    top = max(planned.values()) if planned else None
    return {"planned_bytes": planned, "planned_max_bytes": top, "measured_bytes": peak_mb * 2**20,
            "measured_kind": bench.get("peak_memory_kind"),
            "measured_over_planned": peak_mb * 2**20 / top if top else None}


def _bench_line(b: dict) -> str:
    if not b:
        return ""
    parts = [f"round {_fmt(b.get('round_s_median_all'))} s", f"{_fmt(b.get('tokens_per_s_total'))} tok/s",
             f"FM adapter {'/'.join(b.get('fm_adapter_dtypes') or ['?'])}"]
    limits = b.get("limits") or {}
    ratios = {k: v.get("ratio") for k, v in limits.items() if isinstance(v, dict) and v.get("ratio") is not None}
    if ratios:
        parts.append("limit ratios " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in ratios.items()))
    if b.get("memory"):
        parts.append(f"peak/plan {_fmt(b['memory'].get('measured_over_planned'), '.2f')}")
    return "; ".join(parts)


def junit(path: Path) -> dict | None:
    """Counts and the failing tests' names and messages of pytest's JUnit XML report."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": [], "failed": [], "skipped": []}
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        key = "failed" if bad is not None else "skipped" if skip is not None else "passed"
        entry = {"name": case.get("name"), "seconds": float(case.get("time") or 0.0)}
        if bad is not None or skip is not None:
            entry["message"] = ((bad if bad is not None else skip).get("message") or "")[:1000]
        out[key].append(entry)
    return out


def _tests_line(t: dict) -> str:
    line = f"{len(t['passed'])} passed, {len(t['failed'])} failed, {len(t['skipped'])} skipped"
    return line + ("; failed: " + ", ".join(e["name"] for e in t["failed"]) if t["failed"] else "")


def summary(work: Path, outdir: Path) -> dict:
    phases = []
    for rec in sorted(work.glob("*.phase.json"), key=lambda p: (_load(p) or {}).get("order", 0)):
        r = _load(rec) or {}
        name = r.get("name", rec.name.split(".")[0])
        r["result"] = _load(work / f"{name}.json") or (junit(work / "tests.xml") if name == "tests" else None)
        plan = _load(work / f"{name}.plan.json")
        if r["result"] and plan:
            r["result"]["memory"] = plan_against_peak(r["result"], plan)
        log = work / f"{name}.log"
        r["log_tail"] = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        phases.append(r)
    report = {"cuda": True, "phases": {p["name"]: p for p in phases},
              "total_s": sum(p.get("seconds", 0) for p in phases),
              "limit_s": sum(p.get("limit_s", 0) for p in phases)}
    rows = []
    for p in phases:
        res = p.get("result") or {}
        note = ""
        if p["name"] == "probe" and res:
            bad = [k for k, v in res.get("probes", {}).items() if v.get("ok") is False]
            note = f"{res.get('device_name', '')} · torch {res['versions'].get('torch')} · " + \
                   ("all probes ok" if not bad else f"failed: {', '.join(bad)}")
        elif p["name"] == "kernels" and res:
            errs = [r2.get("max_rel_err", {}).get("triton") for r2 in res.get("results", [])]
            errs = [e for e in errs if e is not None]
            note = f"{len(res.get('results', []))} cases, max rel err {_fmt(max(errs) if errs else None)}, " \
                   f"copy {_fmt(res.get('copy_GBps'))} GB/s"
        elif p["name"].startswith("distill") and res:
            note = _distill_line(res)
        elif p["name"].startswith("pipeline") and res:
            note = _bench_line(res)
        elif p["name"] == "client-step" and res:
            best = [c for c in res.get("cases", []) if c.get("tokens_per_s")]
            note = "; ".join(f"{c['batch']}x{c['length']}{' ckpt' if c['checkpointing'] else ''}: "
                             f"{c['tokens_per_s']:.0f} tok/s, MFU {_fmt(c.get('mfu'), '.2f')}, "
                             f"mem/plan {_fmt(c.get('measured_over_planned'), '.2f')}" for c in best) or "no case ran"
        elif p["name"] == "resume" and res:
            note = "resumed == uninterrupted" if res.get("equal") else f"DIFFERENT: {res}"
        elif p["name"] == "tests" and res:
            note = _tests_line(res)
        elif p["name"] == "doctor" and res:
            a = res.get("allreduce", {})
            note = f"{a.get('world_size')} rank(s), collective ran: {a.get('collective_ran', True)}, " \
                   f"busbw {_fmt(a.get('busbw_GBps'))} GB/s"
        rows.append((p["name"], p.get("rc"), p.get("seconds"), p.get("limit_s"), note))
    report["ok"] = all(p.get("rc") == 0 for p in phases)
    _write(outdir / "gpu-check.json", report)
    lines = ["| phase | exit | s | limit s | result |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {rc} | {s} | {lim} | {note} |" for n, rc, s, lim, note in rows]
    lines.append(f"| all | {'ok' if report['ok'] else 'FAILED'} | {report['total_s']} | {report['limit_s']} | |")
    (outdir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe")
    a.add_argument("out")
    a.add_argument("--device", default="cuda")
    a = sub.add_parser("client-step")
    a.add_argument("out")
    a.add_argument("--model-config", required=True)
    a.add_argument("--plan-config", required=True)
    a.add_argument("--shapes", nargs="+", default=["4x512", "1x4096"])
    a.add_argument("--device", default="cuda")
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--peak-tflops", type=float, default=None)
    a = sub.add_parser("same-weights")
    a.add_argument("a")
    a.add_argument("b")
    a.add_argument("out")
    a = sub.add_parser("summary")
    a.add_argument("work")
    a.add_argument("outdir")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        res = probe(torch.device(args.device))
        _write(args.out, res)
        return 0 if res["ok"] else 1
    if args.cmd == "client-step":
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
        res = client_step(args.model_config, args.plan_config, shapes, torch.device(args.device),
                          getattr(torch, args.dtype), args.steps, args.warmup, args.peak_tflops)
        _write(args.out, res)
        return 0 if all("error" not in c for c in res["cases"]) else 1
    if args.cmd == "same-weights":
        res = same_weights(Path(args.a), Path(args.b))
        _write(args.out, res)
        return 0 if res["equal"] else 1
    report = summary(Path(args.work), Path(args.outdir))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
