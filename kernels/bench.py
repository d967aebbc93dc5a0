"""Benchmark of the neuron-importance kernels: reference vs Triton on this machine's device.

    python -m fedpft_kernels.bench --out bench.json [--sizes sal:3072x768 sal:11008x4096:gated
                                                      act:8x512x3072 act:2x2048x11008]

``sal:DFFxD[:gated]`` times :func:`weight_saliency` on an FFN of ``d_ff`` neurons and model width
``d``: ungated (BERT) reads W_in rows and W_out columns; gated (LLaMA) reads W_gate and W_up rows
and W_down columns. ``act:BxSxN`` times :func:`activation_stats_update` on ``B`` sequences of
``S`` tokens with ``N`` neurons and a padding mask (every other sequence padded after half its
length). Medians of ``--repeat`` timed calls after ``--warmup`` calls, with
``torch.cuda.synchronize`` around each on GPU. Triton runs on CUDA only (``--interpret`` runs it
under the Triton CPU interpreter instead, to check the bench itself).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import reference
from .backend import triton_status

log = logging.getLogger(__name__)

DEFAULT_SIZES = ("sal:3072x768", "sal:11008x4096:gated", "act:8x512x3072", "act:2x2048x11008")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark case parsed from a ``--sizes`` spec."""

    kernel: str  # "weight_saliency" or "activation_stats"
    dims: tuple
    gated: bool = False

    @property
    def spec(self) -> str:
        prefix = "sal" if self.kernel == "weight_saliency" else "act"
        return f"{prefix}:{'x'.join(map(str, self.dims))}{':gated' if self.gated else ''}"


def parse_size(spec: str) -> Case:
    """``sal:DFFxD[:gated]`` or ``act:BxSxN`` (see module docstring)."""
    parts = spec.strip().split(":")
    try:
        dims = tuple(int(x) for x in parts[1].lower().split("x"))
    except (IndexError, ValueError):
        dims = ()
    if parts[0] == "sal" and len(dims) == 2 and parts[2:] in ([], ["gated"]):
        return Case("weight_saliency", dims, gated=parts[2:] == ["gated"])
    if parts[0] == "act" and len(dims) == 3 and len(parts) == 2:
        return Case("activation_stats", dims)
    raise ValueError(f"--sizes: {spec!r} must look like sal:DFFxD, sal:DFFxD:gated or act:BxSxN")


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds; synchronised so GPU time is what is measured."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: relative to the scale of the vector, so near-zero entries of a
    norm or a sum of |a| do not blow it up."""
    got, ref = got.double().cpu(), ref.double().cpu()
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / scale if scale > 0 else (got - ref).abs().max().item()


def _saliency_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    d_ff, d = case.dims
    # Weights at the ~1/sqrt(d) scale of trained FFNs; generated in fp32 then cast, same values per dtype.
    def mat(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) / d ** 0.5).to(dtype=dtype)

    rows = [mat(d_ff, d), mat(d_ff, d)] if case.gated else [mat(d_ff, d)]
    return rows, [mat(d, d_ff)]


def _activation_inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    b, s, n = case.dims
    act = torch.randn(b, s, n, generator=gen, device=device)
    act = torch.where(act > 0, act, act * 0.01)  # leaky-ReLU-like, with some exact zeros below
    act[torch.rand(b, s, n, generator=gen, device=device) < 0.05] = 0.0
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1::2, s // 2 + 1:] = 0  # every other sequence is padded after half its length
    return act.to(device=device, dtype=dtype), mask.to(device)


def run_case(case: Case, dtype: torch.dtype, device: torch.device, impls: Dict[str, object], warmup: int,
             repeat: int, eps: float) -> dict:
    """Time every implementation on one case; compare each to the reference."""
    gen = torch.Generator(device=device).manual_seed(0)  # inputs drawn where they are used
    result: dict = {"kernel": case.kernel, "spec": case.spec, "dtype": str(dtype).replace("torch.", ""),
                    "ms": {}, "speedup": None, "max_rel_err": {}}
    outputs: Dict[str, object] = {}
    if case.kernel == "weight_saliency":
        rows, cols = _saliency_inputs(case, dtype, device, gen)
        result["shapes"] = {"rows": [list(m.shape) for m in rows], "cols": [list(m.shape) for m in cols]}
        result["gated"] = case.gated
        result["bytes_read"] = sum(m.numel() * m.element_size() for m in rows + cols)
        for name, mod in impls.items():
            outputs[name] = mod.weight_saliency(rows, cols)
            result["ms"][name] = _time_ms(lambda: mod.weight_saliency(rows, cols), device, warmup, repeat)
        for name, out in outputs.items():
            result["max_rel_err"][name] = _max_rel_err(out, outputs["reference"])
    else:
        act, mask = _activation_inputs(case, dtype, device, gen)
        result["shapes"] = {"act": list(act.shape), "mask": list(mask.shape)}
        result["real_tokens"] = int(mask.sum().item())
        result["bytes_read"] = act.numel() * act.element_size()
        n = act.shape[-1]
        for name, mod in impls.items():
            stats = reference.ActivationStats.zeros(n, device)
            mod.activation_stats_update(act, mask, eps, stats.sum_abs, stats.zero_count, stats.token_count)
            outputs[name] = stats
            timed = reference.ActivationStats.zeros(n, device)
            result["ms"][name] = _time_ms(
                lambda: mod.activation_stats_update(act, mask, eps, timed.sum_abs, timed.zero_count,
                                                    timed.token_count), device, warmup, repeat)
        ref = outputs["reference"]
        result["count_mismatches"] = {}
        for name, out in outputs.items():
            result["max_rel_err"][name] = _max_rel_err(out.sum_abs, ref.sum_abs)
            # Counts are integers: they must match exactly (a neuron off by one shows up here).
            result["count_mismatches"][name] = int((out.zero_count != ref.zero_count).sum().item()
                                                   + int(out.token_count.item() != ref.token_count.item()))
    if "triton" in result["ms"]:
        result["speedup"] = result["ms"]["reference"] / result["ms"]["triton"]
    # Both kernels read their inputs once and write a vector: the bytes read over the time is the
    # bandwidth they reach, to set against a device-to-device copy's.
    result["GBps"] = {name: result["bytes_read"] / (ms * 1e-3) / 1e9 for name, ms in result["ms"].items() if ms > 0}
    return result


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeat: int) -> dict:
    """A device-to-device copy of ``nbytes``: GB/s counting the bytes read and the bytes written, the
    memory system's practical ceiling for a kernel that streams its inputs once."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, warmup, repeat)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": src.numel() * src.element_size(), "ms": ms, "GBps": moved / (ms * 1e-3) / 1e9}


def _triton_plan(device: torch.device, interpret: bool) -> tuple[Optional[object], Optional[str]]:
    """(the Triton kernel module or None, why Triton is skipped or None)."""
    status = triton_status()
    if not status["installed"]:
        return None, f"triton not installed ({status['error']})"
    if interpret:
        if device.type == "cuda":
            return None, "--interpret is for CPU runs"
        from . import triton_kernels
        if not triton_kernels.INTERPRETED:
            return None, "triton was imported before TRITON_INTERPRET=1 could be set"
        return triton_kernels, None
    if device.type != "cuda":
        return None, f"device is {device.type}: Triton kernels run on CUDA only (driver: {status['error']})"
    if status["driver"] is None:
        return None, f"no active Triton GPU driver ({status['error']})"
    from . import triton_kernels
    return triton_kernels, None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def run(sizes: Sequence[str], dtypes: Sequence[str], device: torch.device, warmup: int, repeat: int,
        eps: float = 0.0, interpret: bool = False, copy_baseline: bool = False) -> dict:
    """Run every (size, dtype) case and return the JSON-ready report."""
    cases = [parse_size(s) for s in sizes]
    triton_mod, skipped = _triton_plan(device, interpret)
    impls: Dict[str, object] = {"reference": reference}
    if triton_mod is not None:
        impls["triton"] = triton_mod
    status = triton_status()
    report = {
        "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "triton": status["version"],
        "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        "implementations": list(impls), "triton_skipped": skipped, "triton_interpreted": bool(interpret and triton_mod),
        "warmup": warmup, "repeat": repeat, "eps": eps, "results": [],
    }
    if copy_baseline:
        report["copy"] = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 24, warmup, repeat)
        report["copy_GBps"] = report["copy"]["GBps"]
    for case in cases:
        for dt in dtypes:
            res = run_case(case, DTYPES[dt], device, impls, warmup, repeat, eps)
            if copy_baseline:
                res["fraction_of_copy"] = {k: v / report["copy_GBps"] for k, v in res["GBps"].items()}
            report["results"].append(res)
            log.info("%-28s %-8s %s", case.spec, res["dtype"],
                     "  ".join(f"{k} {v:9.3f} ms" for k, v in res["ms"].items())
                     + (f"  speed-up {res['speedup']:.2f}x" if res["speedup"] else ""))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpft_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON report to write")
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES),
                        help="cases: sal:DFFxD, sal:DFFxD:gated, act:BxSxN (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.0, help="APoZ threshold |a| <= eps")
    parser.add_argument("--interpret", action="store_true",
                        help="on CPU, also run the Triton kernels under the interpreter (slow; checks the bench)")
    parser.add_argument("--copy-baseline", action="store_true",
                        help="also time a device-to-device copy (1 GiB on CUDA) and give each kernel's GB/s as a "
                             "fraction of it")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeat < 1:
        parser.error(f"--warmup must be >= 0 and --repeat >= 1, got {args.warmup} and {args.repeat}")
    try:
        for s in args.sizes:
            parse_size(s)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.interpret and "triton" not in sys.modules:
        # The interpreter must be asked for before triton's first import (triton_status imports it).
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = run(args.sizes, args.dtypes, device, args.warmup, args.repeat, args.eps, args.interpret,
                 args.copy_baseline)
    if report["triton_skipped"]:
        log.info("triton skipped: %s", report["triton_skipped"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
