"""``fedpft bench``: one federated workload, timed phase by phase, written to ``bench.json``.

The run is a real ``fedpft train`` run (same config tree, same engine) whose round hooks put a
barrier before each aggregation, so that the all-reduce is timed without the wait for the slowest rank (the wait is
reported on its own). The headline is ``round_s_median_all``: the median whole round, whatever it does
(train, aggregate, align, evaluate, fidelity). After the last round the same job measures, on the same
models and data:

* each phase's limit (:mod:`.limits`): a bare training loop, bare sorted inference, a bare
  distillation step, and each phase's ratio to it;
* a bare all-reduce of exactly the aggregation's bytes (one float64 buffer), to compare with the
  engine's all-reduce, which also packs the adapter into that buffer and unpacks it;
* local training steps with and without activation-statistics collection (the hooks that feed
  neuron-level alignment), alternating, on every rank.

Medians are over the rounds after ``bench.warmup_rounds``; ``round_s_median`` over those of them that
only train and aggregate. Per-rank values (tokens/s, peak memory) are gathered with one all-reduce
each, every rank filling its own slot. The peak memory is the run's, taken before the measurements.
Where the ranks ran (:func:`placement`: nodes, ranks per node, machines, cores, oversubscription) is
recorded too, for ``fedpft report``'s scaling table.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import Config
from ..errors import ConfigError, UserError
from ..fsutil import atomic_write_json
from ..federation.callbacks import CLIENT_PARTS
from ..federation.sampling import client_seed
from ..federation.server_step import NeuronAlignment
from ..run_layout import RunLayout
from ..runtime import Runtime, init_from_config
from . import limits as L
from .limits import sync_device

log = logging.getLogger(__name__)


def _median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated device memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gather_per_rank(rt: Runtime, values: Sequence[float], name: str) -> list[list[float]]:
    """``values`` of every rank, as ``out[rank][i]`` (a sum where each rank fills its own row)."""
    buf = torch.zeros(rt.world_size, len(values), dtype=torch.float64)
    buf[rt.rank] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return rt.comm.all_reduce_sum({"v": buf}, name=name)["v"].tolist()


def _machine_id() -> int:
    """This machine's kernel boot id as a 48-bit number (exact in a float64): network namespaces and
    containers on one machine share it, two machines do not; the host name where there is none."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        text = platform.node()
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def placement(rt: Runtime) -> dict:
    """Where the ranks ran. ``nodes``: the launcher's nodes (ranks of local rank 0); ``machines``: the
    physical machines under them (distinct boot ids: two network-namespace "nodes" of one machine are
    one); ``oversubscribed``: some machine runs more threads (ranks x threads per rank) than it has
    cores, or some rank more threads than the CPUs it is bound to."""
    try:
        bound = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        bound = os.cpu_count() or 1
    rows = gather_per_rank(rt, [rt.local_rank == 0, rt.launch.local_world_size, os.cpu_count() or 1, bound,
                                rt.threads, _machine_id()], "bench/placement")
    machines: dict[float, list[list[float]]] = {}
    for row in rows:
        machines.setdefault(row[5], []).append(row)
    threads = {m: sum(r[4] for r in ranks) for m, ranks in machines.items()}
    cores = {m: min(r[2] for r in ranks) for m, ranks in machines.items()}
    return {"launch": rt.launch.kind, "nodes": int(sum(r[0] for r in rows)),
            "ranks_per_node": int(max(r[1] for r in rows)), "machines": len(machines),
            "cores_per_machine": int(min(cores.values())), "threads_per_machine": int(max(threads.values())),
            "oversubscribed": any(threads[m] > cores[m] for m in machines) or any(r[4] > r[3] for r in rows)}


def time_bare_allreduce(rt: Runtime, num_bytes: int, iters: int, warmup: int = 3) -> dict:
    """Median time of an all-reduce of one float64 buffer of ``num_bytes`` (a barrier before each, so
    no rank's late arrival is counted), and the bandwidths it achieves."""
    buf = torch.ones(max(1, num_bytes // 8), dtype=torch.float64, device=rt.comm.device)
    times = []
    for i in range(warmup + iters):
        rt.comm.barrier(name="bench/bare-allreduce-barrier")
        sync_device(buf.device)
        t0 = time.perf_counter()
        rt.comm.all_reduce_(buf, name="bench/bare-allreduce")
        sync_device(buf.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"seconds": seconds, **bandwidth(num_bytes, seconds, rt.world_size)}


def bandwidth(num_bytes: float, seconds: Optional[float], world_size: int) -> dict:
    """Algorithm bandwidth (bytes / time) and bus bandwidth (x 2(W-1)/W, what a ring all-reduce moves
    over each link), in GB/s; None on one rank, where there is nothing to move."""
    if world_size < 2 or not seconds:
        return {"algbw_gbps": None, "busbw_gbps": None}
    alg = num_bytes / seconds / 1e9
    return {"algbw_gbps": alg, "busbw_gbps": alg * 2 * (world_size - 1) / world_size}


def time_stats_overhead(cfg: Config, rt: Runtime, engine, steps: int, reps: int = 3) -> dict:
    """Seconds per local step without and with activation-statistics hooks, alternating the two
    ``reps`` times on the same client data (client ``rank mod num_clients``, cut to ``steps``
    batches)."""
    from ..data.tasks import ClientData
    from ..federation.client import train_client
    from ..models.families import transformer_layers
    from ..models.proxy import ActivationRecorder

    models, task, adapter = engine.parts.models, engine.parts.task, engine.parts.state.global_adapter
    f = cfg.fed
    c = rt.rank % f.num_clients
    data = task.client(c)
    n = min(len(data), steps * f.batch_size)
    data = ClientData(*(t[:n] if t is not None else None for t in
                        (data.input_ids, data.attention_mask, data.labels, data.token_type_ids)))
    n_steps = -(-n // f.batch_size)
    hf = models.client.get_base_model()
    layers = models.compressed_layers or list(range(len(transformer_layers(hf))))

    def one(record: bool) -> float:
        recorder = ActivationRecorder(hf, layers, cfg.proxy.eps) if record else None
        sync_device(rt.device)
        t0 = time.perf_counter()
        train_client(models.client, adapter, data, 1, f.batch_size, f.lr, f.weight_decay, cfg.run.seed, recorder)
        sync_device(rt.device)
        seconds = time.perf_counter() - t0
        if recorder is not None:
            recorder.close()
        return seconds / n_steps

    one(False)  # warm-up
    plain, hooked = [], []
    for _ in range(reps):
        plain.append(one(False))
        hooked.append(one(True))
    p, h = statistics.median(plain), statistics.median(hooked)
    return {"step_s_without": p, "step_s_with": h, "steps": n_steps, "layers": len(layers)}


def summarise(cfg: Config, rt: Runtime, rounds: list[dict]) -> dict:
    """Per-round records of every rank -> the medians and per-rank figures of bench.json."""
    parts = [f"client_{k}" for k in CLIENT_PARTS]
    keys = ("round", "local_training", "wait", "allreduce", "aggregation", "alignment", "evaluation", "fidelity",
            "tokens", "clients", "align_step_seconds", "align_set_up_seconds", *parts)
    table = [[r.get(k, 0.0) for k in keys] for r in rounds]
    flat = [x for row in table for x in row]
    gathered = gather_per_rank(rt, flat, name="bench/rounds")
    per_rank = [[dict(zip(keys, g[i * len(keys):(i + 1) * len(keys)])) for i in range(len(rounds))]
                for g in gathered]
    skip = min(cfg.bench.warmup_rounds, max(0, len(rounds) - 1))
    measured = range(skip, len(rounds))

    def worst(key: str, i: int) -> float:  # the slowest rank sets the pace of a lockstep round
        return max(per_rank[r][i][key] for r in range(rt.world_size))

    train_rounds = [worst("round", i) - worst("alignment", i) - worst("evaluation", i) for i in measured]
    # Rounds that align or evaluate are timed in alignment_s / evaluation_s; the round time is that of
    # the rounds that only train and aggregate (all measured rounds when every one does more).
    plain = [i for i in measured if worst("alignment", i) == 0 and worst("evaluation", i) == 0]
    tokens_per_s = []
    for r in range(rt.world_size):
        tok = sum(per_rank[r][i]["tokens"] for i in measured)
        sec = sum(per_rank[r][i]["local_training"] for i in measured)
        tokens_per_s.append(tok / sec if sec else 0.0)
    imbalance = [worst("local_training", i) / max(1e-12, statistics.fmean(
        per_rank[r][i]["local_training"] for r in range(rt.world_size))) for i in measured]
    align = [i for i in measured if worst("alignment", i) > 0]
    evals = [worst("evaluation", i) for i in measured if worst("evaluation", i) > 0]
    fidelity = [worst("fidelity", i) for i in measured if worst("fidelity", i) > 0]
    # Per client, over every rank's clients of the measured rounds: the fixed cost (everything but
    # the batches) next to the compute.
    clients = sum(per_rank[r][i]["clients"] for r in range(rt.world_size) for i in measured)
    spent = {k[len("client_"):]: sum(per_rank[r][i][k] for r in range(rt.world_size) for i in measured)
             for k in parts}
    per_client_ms = {k: 1e3 * v / max(1, clients) for k, v in spent.items()}
    per_client_ms["fixed"] = sum(v for k, v in per_client_ms.items() if k != "compute")
    return {
        "rounds_measured": len(measured),
        # the headline: whole rounds, whatever they do (train, aggregate, align, evaluate, fidelity)
        "round_s_median_all": _median([worst("round", i) for i in measured]),
        "round_s_median": _median([worst("round", i) for i in (plain or measured)]),
        "rounds_plain": len(plain),
        "train_round_s_median": _median(train_rounds),
        "local_training_s_median": _median([worst("local_training", i) for i in measured]),
        "wait_s_median": _median([worst("wait", i) for i in measured]),
        "allreduce_s": _median([worst("allreduce", i) for i in measured]),
        "aggregation_s": _median([worst("aggregation", i) for i in measured]),
        "load_imbalance_median": _median(imbalance),
        "tokens_per_s_per_rank": tokens_per_s,
        "tokens_per_s_total": sum(sum(per_rank[r][i]["tokens"] for r in range(rt.world_size)) for i in measured)
                              / max(1e-12, sum(worst("round", i) for i in measured)),
        "clients_per_rank": [sum(per_rank[r][i]["clients"] for i in measured) / max(1, len(measured))
                             for r in range(rt.world_size)],
        "alignment_s": _median([worst("alignment", i) for i in align]), "alignment_rounds": len(align),
        "alignment_step_s": _median([worst("align_step_seconds", i) for i in align]),
        "alignment_set_up_s": _median([worst("align_set_up_seconds", i) for i in align]),
        "evaluation_s": _median(evals), "evaluation_rounds": len(evals),
        "fidelity_s": _median(fidelity), "fidelity_rounds": len(fidelity),
        "clients_measured": clients, "per_client_ms": per_client_ms,
    }


def run_bench(cfg: Config, echo: Callable[[str], None] = print) -> dict:
    """Run the workload of ``cfg`` and write bench.json (rank 0); returns the result on every rank."""
    from ..federation.engine import Engine, RoundHooks

    if cfg.dist.ranks_per_client > 1:
        # its limits (the bare loop, the statistics overhead) time one rank training whole batches
        raise ConfigError("dist.ranks_per_client", "fedpft bench measures one rank per client; client groups are "
                                                   "measured by fedpft train's per-rank timings (metrics.jsonl)")
    with init_from_config(cfg) as rt:
        rounds: list[dict] = []
        hooks = RoundHooks(before_aggregate=lambda: rt.comm.barrier(name="aggregate/wait-for-ranks"),
                           after_round=rounds.append)
        engine = Engine(cfg, rt, hooks)
        t0 = time.perf_counter()
        summary = engine.run()
        run_seconds = time.perf_counter() - t0
        if summary["stopped_early"] or not rounds:
            raise UserError("fedpft bench needs a run that trains rounds: unset fed.stop_after and "
                            "fed.resume, or give a fresh run.dir")
        # the run's own peak, before the measurements below add theirs
        run_peak = gather_per_rank(rt, [peak_memory_mb(rt.device)], "bench/run-peak-memory")
        result = summarise(cfg, rt, rounds)
        result["peak_memory_mb_per_rank"] = [row[0] for row in run_peak]
        result["startup_s"] = max_per_key(rt, summary["startup_seconds"])
        result["placement"] = placement(rt)
        # The evaluation FM's adapter after the run's alignments: at ZeRO 0-2 the FM is the alignment's
        # teacher, which DeepSpeed's engine casts to its training dtype; the adapter must keep its own.
        result["fm_adapter_dtypes"] = sorted({str(p.dtype).replace("torch.", "")
                                              for n, p in engine.parts.models.evaluate.named_parameters()
                                              if "lora_" in n})
        result.update(measure_limits(cfg, rt, engine, rounds, result))
    out = {
        "benchmark": "federated", "world_size": rt.world_size, "device": rt.device.type,
        "backend": rt.backend, "threads_per_rank": rt.threads, "host": platform.node(),
        "torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(rt.device)
        if rt.device.type == "cuda" else None,
        "method": cfg.fed.method, "model": cfg.model.path, "rounds": cfg.fed.rounds,
        "clients_per_round": summary["clients_per_round"], "warmup_rounds": cfg.bench.warmup_rounds,
        **result,
        "final_accuracy": summary.get("final_accuracy"), "run_seconds": run_seconds,
        "run_dir": cfg.run.dir, "per_round": rounds if rt.is_main else None,
    }
    if rt.is_main:
        path = RunLayout.from_config(cfg).bench
        atomic_write_json(path, out)
        echo(format_result(out, path))
    return out


def max_per_key(rt: Runtime, values: dict) -> dict:
    """The slowest rank's value of each key (start-up: the first round begins when the last rank is ready)."""
    return rt.comm.all_reduce_metrics(dict(values), op="max", name="bench/max-per-key")


def measure_limits(cfg: Config, rt: Runtime, engine, rounds: list[dict], result: dict) -> dict:
    """Measurements of its own on the run's models and data: a bare all-reduce of the aggregation's
    bytes, local steps with and without activation statistics, each phase's limit (module
    :mod:`.limits`) and the phase's ratio to it."""
    agg_bytes = int(rounds[-1]["aggregation_bytes"])
    log.info("timing a bare all-reduce of %d bytes", agg_bytes)
    bare = time_bare_allreduce(rt, agg_bytes, cfg.bench.allreduce_iters)
    log.info("timing local steps with and without activation statistics")
    stats = time_stats_overhead(cfg, rt, engine, cfg.bench.stats_steps)
    stats_all = gather_per_rank(rt, [stats["step_s_without"], stats["step_s_with"]], "bench/stats-overhead")
    limits = phase_limits(cfg, rt, engine, result, rounds)
    peak = gather_per_rank(rt, [peak_memory_mb(rt.device)], "bench/peak-memory")
    return {
        "aggregation_bytes": agg_bytes,
        "bare_allreduce_s": bare["seconds"],
        "allreduce_bandwidth": bandwidth(agg_bytes, result["allreduce_s"], rt.world_size),
        "bare_allreduce_bandwidth": {k: bare[k] for k in ("algbw_gbps", "busbw_gbps")},
        "stats_overhead": statistics.fmean(w / p - 1.0 for p, w in stats_all),
        "stats_step_s_per_rank": [{"without": p, "with": w} for p, w in stats_all],
        "stats_steps": stats["steps"], "stats_layers": stats["layers"],
        "limits": limits,
        "peak_memory_mb_per_rank_with_limits": [row[0] for row in peak],
        "peak_memory_kind": "cuda_max_allocated" if rt.device.type == "cuda" else "rss",
    }


def _ratio(limit: Optional[float], actual: Optional[float]) -> Optional[float]:
    return limit / actual if limit and actual else None


def phase_limits(cfg: Config, rt: Runtime, engine, result: dict, rounds: list[dict]) -> dict:
    """Each phase against its limit, every rank measuring its own share: local training in tokens/s
    (each rank's last round against the bare loop over the same clients; the slowest ratio counts), evaluation in seconds
    (the slowest rank's bare pass against the phase), alignment in seconds per step."""
    f, parts = cfg.fed, engine.parts
    models, task, adapter = parts.models, parts.task, parts.state.global_adapter
    reps = cfg.bench.limit_reps
    log.info("timing a bare training loop, bare inference and a bare distillation step")
    last = engine.plan(f.rounds - 1)   # the clients this rank trained in the last round, and their seeds
    clients = [(task.client(c), client_seed(cfg.run.seed, last.index, c)) for c in last.mine]
    train = L.bare_training(cfg, rt, models.client, adapter, clients) if not task.causal_lm else None
    models.clients_trained()   # the bare loops above trained the client model: the FM itself for fedpetuning
    models.plug(adapter)
    idx = torch.arange(rt.rank, len(task.test_ids), rt.world_size)
    types = task.test_types[idx] if task.test_types is not None else None
    infer = L.bare_inference(rt, models.evaluate, task.test_ids[idx], task.test_mask[idx], types,
                             f.eval_batch_size, reps) if not task.causal_lm else None
    step = None
    if result["alignment_rounds"] and isinstance(parts.server_step, NeuronAlignment):
        step = L.bare_distill_step(cfg, rt, models.fm_backbone, models.proxy_dir, models.client_prefix, adapter,
                                   models.compressed_layers, parts.server_step.public[0], max(3, reps))
    final = rounds[-1]
    round_tps = final["tokens"] / final["local_training"] if final["local_training"] else 0.0
    row = gather_per_rank(rt, [train["tokens_per_s"] if train else 0.0, infer or 0.0, step or 0.0, round_tps],
                          "bench/limits")
    bare_tps, last_tps = [r[0] for r in row], [r[3] for r in row]
    train_ratios = [_ratio(tps, bare) for tps, bare in zip(last_tps, bare_tps)]
    bare_eval, bare_step = max(r[1] for r in row), max(r[2] for r in row)
    return {
        # the last round's clients on each rank, trained by the engine and by the bare loop
        "local_training": {"tokens_per_s_per_rank": last_tps, "bare_tokens_per_s_per_rank": bare_tps,
                           "ratio_per_rank": train_ratios,
                           "ratio": min((r for r in train_ratios if r is not None), default=None)},
        "evaluation": {"seconds": result["evaluation_s"], "bare_seconds": bare_eval or None,
                       "ratio": _ratio(bare_eval, result["evaluation_s"])},
        "alignment": {"step_s": result["alignment_step_s"], "bare_step_s": bare_step or None,
                      "ratio": _ratio(bare_step, result["alignment_step_s"]),
                      "set_up_s": result["alignment_set_up_s"], "phase_s": result["alignment_s"]},
    }


def placement_text(p: dict) -> str:
    """``2 node(s) x 2 rank(s) on 1 machine(s), 4 threads on 2 cores (oversubscribed)``."""
    return (f"{p['nodes']} node(s) x {p['ranks_per_node']} rank(s) on {p['machines']} machine(s), "
            f"{p['threads_per_machine']} threads on {p['cores_per_machine']} cores"
            + (" (oversubscribed)" if p["oversubscribed"] else ""))


def format_result(r: dict, path: Path) -> str:
    def s(x: Optional[float], unit: str = "s") -> str:
        return "n/a" if x is None else f"{x * 1000:.1f} ms" if unit == "s" and x < 1 else f"{x:.3g} {unit}"

    def ratio(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.2f} of its limit"

    lim = r["limits"]
    bw = r["allreduce_bandwidth"]["algbw_gbps"]
    bare_bw = r["bare_allreduce_bandwidth"]["algbw_gbps"]
    up = r["startup_s"]
    lines = [
        f"fedpft bench: {r['method']} on {r['world_size']} rank(s) ({r['device']}, {r['backend']}, "
        f"{r['threads_per_rank']} thread(s) per rank), {r['rounds_measured']} rounds measured",
        f"  round (median, all)       {s(r['round_s_median_all'])}"
        + (f"; {s(r['round_s_median'])} over the {r['rounds_plain']} that only train and aggregate"
           if r["rounds_plain"] else ""),
        f"  local training            {s(r['local_training_s_median'])}; tokens/s per rank "
        f"{', '.join(f'{x:.0f}' for x in r['tokens_per_s_per_rank'])}; last round "
        f"{ratio(lim['local_training']['ratio'])} (bare loop, same clients)",
        f"  alignment                 {s(r['alignment_s'])} ({r['alignment_rounds']} rounds); step "
        f"{s(r['alignment_step_s'])}, {ratio(lim['alignment']['ratio'])} (bare KD step); set-up "
        f"{s(r['alignment_set_up_s'])}",
        f"  evaluation                {s(r['evaluation_s'])} ({r['evaluation_rounds']} rounds), "
        f"{ratio(lim['evaluation']['ratio'])} (bare sorted inference)",
        f"  fidelity                  {s(r['fidelity_s'])} ({r['fidelity_rounds']} rounds)",
        f"  per client                fixed {r['per_client_ms']['fixed']:.2f} ms (" + ", ".join(
            f"{k} {r['per_client_ms'][k]:.2f}" for k in CLIENT_PARTS if k != "compute")
        + f"), compute {r['per_client_ms']['compute']:.1f} ms, over {r['clients_measured']} clients",
        f"  load imbalance (max/mean) {r['load_imbalance_median']:.3f}",
        f"  placement                 {placement_text(r['placement'])}",
        f"  aggregation               {s(r['aggregation_s'])}, {r['aggregation_bytes'] / 2**20:.2f} MiB; "
        f"all-reduce {s(r['allreduce_s'])}" + (f" ({bw:.2f} GB/s)" if bw else "")
        + f", bare {s(r['bare_allreduce_s'])}" + (f" ({bare_bw:.2f} GB/s)" if bare_bw else ""),
        f"  activation-stats overhead {r['stats_overhead'] * 100:+.1f}% per local step",
        f"  time to first round       {s(up['total'])} (task {s(up['task'])}, models {s(up['models'])}, "
        f"public text {s(up['public_text'])})",
        f"  peak memory per rank      {', '.join(f'{x:.0f}' for x in r['peak_memory_mb_per_rank'])} MiB "
        f"({r['peak_memory_kind']}; the run's, before the limits are measured)",
        f"  written to {path}",
    ]
    return "\n".join(lines)
