"""DeepSpeed ZeRO integration: the only module of fedpft-dist that imports ``deepspeed``.

Everything the distillations need from DeepSpeed goes through these functions: the engine, the
ZeRO-3 loading context for transformers, gathering partitioned parameters, and reading/writing the
full fp32 parameters and Adam moments of trainable parameters for checkpoints (so checkpoints are
safetensors + JSON and independent of DeepSpeed's pickle files).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

ADAM_STATES = ("exp_avg", "exp_avg_sq")

def deepspeed_status() -> dict:
    """Version, accelerator, communication backend and which C++/CUDA ops are pre-built.

    Ops that are not pre-built compile on first use (JIT), which costs time at the first run of a
    job; ``DS_BUILD_OPS=1`` at install time builds them ahead.
    """
    info: dict = {"installed": False, "version": None, "accelerator": None, "comm_backend": None,
                  "ds_accelerator_env": os.environ.get("DS_ACCELERATOR"), "prebuilt_ops": [],
                  "jit_ops": [], "error": None}
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:
        info["error"] = f"{exc.__class__.__name__}: {exc}"
        return info
    info["installed"] = True
    info["version"] = deepspeed.__version__
    acc = get_accelerator()
    info["accelerator"] = acc.device_name()
    info["comm_backend"] = acc.communication_backend_name()
    info["prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    info["jit_ops"] = sorted(k for k, v in installed_ops.items() if not v)
    return info


def make_ds_config(stage: int, micro_batch: int, world_size: int, bf16: bool, grad_clip: float,
                   grad_accum: int = 1) -> dict:
    """The DeepSpeed config of a distillation job. Small models are partitioned at stage 3 too
    (``stage3_param_persistence_threshold: 0``), so the memory behaviour tested on CPU is the one a
    large FM gets."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bool(bf16)},
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }
    if stage == 3:
        # memory_efficient_linear off: otherwise zero.Init replaces torch.nn.functional.linear for the
        # rest of the process, and the federated clients trained after a distillation would compute
        # with DeepSpeed's linear (different rounding than a process that never distilled). No
        # prefetch and no reuse: a module's parameters are gathered for its forward or backward and
        # released after it, so what a rank holds gathered is one module (fedpft memory-plan's term).
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "memory_efficient_linear": False,
                                         "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0,
                                         "stage3_max_live_parameters": 10**9})
    return cfg


@contextlib.contextmanager
def zero3_loading(ds_config: dict) -> Iterator[None]:
    """While active, transformers' ``from_pretrained`` partitions weights as it loads them (ZeRO-3),
    so no rank ever holds a whole model. Entered only at stage 3. (Wrapping a transformers
    constructor in ``deepspeed.zero.Init`` fails; this is the working route.)"""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    linear = torch.nn.functional.linear
    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: keep this one
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()
        torch.nn.functional.linear = linear  # never leave a patched F.linear behind


def init_distributed(backend: str) -> None:
    """Tell DeepSpeed to use the process group the runtime already created."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def initialize(module: nn.Module, params: list, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict):
    """A DeepSpeed engine over ``module`` that trains only ``params``."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    return engine


def release(engine) -> None:
    """Free what a finished job holds. DeepSpeed keeps a ZeRO-3 engine reachable from two module
    globals after its last step: the stack of modules in a forward pass (the wrapped module stays on
    it) and an ``lru_cache`` on a method of the parameter coordinator class (the coordinator, its
    parameters and through them the optimizer are in its keys). Without this, every distillation
    and alignment job would stay in memory for the life of the process: teacher and student
    partitions, the flat fp32 master and gradient buffers (about 1.2 GB for SmolLM2-135M on the CPU,
    on the GPU at scale). ``engine.destroy()`` takes down its hooks first."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine.destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    for attr in vars(PartitionedParameterCoordinator).values():
        # the cached method sits inside DeepSpeed's NVTX wrapper (a closure)
        for fn in (attr, *(c.cell_contents for c in (getattr(attr, "__closure__", None) or ()))):
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Full values of (possibly ZeRO-3-partitioned) parameters inside the block; a collective: every
    rank enters it with the same parameters. With ``modifier_rank`` set, that rank's changes are
    partitioned back on exit. A no-op for parameters that are not partitioned."""
    import deepspeed

    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def partition_like(params: list[torch.Tensor], reference: torch.Tensor) -> None:
    """Partition plain ``params`` over the ranks as ZeRO-3 partitioned ``reference`` (what
    ``deepspeed.initialize`` does to a module's plain parameters, done now: a rank then keeps its
    partition only). Parameters already partitioned, and a plain ``reference``, are left as they are."""
    plain = [p for p in params if not is_partitioned(p)]
    if plain and is_partitioned(reference):
        reference.convert_to_zero_parameters(param_list=plain)


def held_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole parameters), from the partitions."""
    held = full = 0
    for p in module.parameters():
        if is_partitioned(p):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
        else:
            held += p.numel() * p.element_size()
            full += p.numel() * p.element_size()
    return held, full


def _zero_optimizer(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if _zero_optimizer(engine) else opt


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer steps: the flat fp32 partitions at ZeRO stages 1-3 (stage 3
    empties the param groups between steps), the parameters themselves at stage 0."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flat = getattr(opt, attr, None)
        if flat:
            return list(flat)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def full_fp32_params(engine, named_params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters, on the CPU: the optimizer's fp32 master weights
    where it keeps them (ZeRO stages >= 1, bf16), the parameters themselves otherwise. A collective at
    ZeRO stages >= 1 (every rank calls it with the same parameters)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _zero_optimizer(engine) or engine.bfloat16_enabled()
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params.items():
        value = safe_get_full_fp32_param(p) if masters else None
        if value is None:
            with gathered([p]):
                value = p.detach()
        out[name] = value.detach().float().cpu().clone()
    return out


def partitioned(engine) -> bool:
    """Whether the engine partitions its parameters (ZeRO-3): then no rank holds them whole."""
    return engine.zero_optimization_stage() == 3


def local_fp32_finite(named_params: dict[str, nn.Parameter]) -> bool:
    """Whether this rank's partitions of the fp32 master weights of ZeRO-3 parameters are all finite
    (no collective: each rank reads its own)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return all(bool(torch.isfinite(safe_get_local_fp32_param(p)).all()) for p in named_params.values())


def get_full_train_state(engine, named_params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full fp32 values and Adam moments of the trainable parameters, keys ``<name>``,
    ``<name>::exp_avg``, ``<name>::exp_avg_sq``. A collective at ZeRO stages >= 1 (every rank calls
    it); every rank gets the full tensors, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    zero = _zero_optimizer(engine)
    opt = engine.optimizer
    for name, p in named_params.items():
        if zero:
            out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for key in ADAM_STATES:
                value = safe_get_full_optimizer_state(p, key)
                out[f"{name}::{key}"] = (value if value is not None else torch.zeros_like(out[name])).float().cpu()
        else:
            out[name] = p.detach().float().cpu().clone()
            state = opt.state.get(p, {})
            for key in ADAM_STATES:
                out[f"{name}::{key}"] = state[key].float().cpu().clone() if key in state else torch.zeros_like(out[name])
    return out


def sharded_train_state(named_params: dict[str, nn.Parameter]) -> bool:
    """Whether the trainable parameters are ZeRO-3 partitions, whose state each rank saves as its own
    share (:func:`get_local_train_state`)."""
    return any(is_partitioned(p) for p in named_params.values())


def get_local_train_state(named_params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """This rank's share of the fp32 values and Adam moments of ZeRO-3 partitioned parameters, keys as
    :func:`get_full_train_state`'s, on the CPU. No collective: a checkpoint of it is one file per rank,
    which only the same world size and stage can read back."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    out: dict[str, torch.Tensor] = {}
    for name, p in named_params.items():
        out[name] = safe_get_local_fp32_param(p).detach().float().cpu().clone()
        for key in ADAM_STATES:
            value = safe_get_local_optimizer_state(p, key)
            out[f"{name}::{key}"] = (value.detach().float().cpu().clone() if value is not None
                                     else torch.zeros_like(out[name]))
    return out


def set_local_train_state(engine, named_params: dict[str, nn.Parameter], state: dict[str, torch.Tensor],
                          step: int) -> None:
    """Inverse of :func:`get_local_train_state` on the rank that saved it, plus the optimizer step count."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    base = _base_optimizer(engine)
    _create_adam_state(engine, base)
    for name, p in named_params.items():
        value = state[name]
        safe_set_local_fp32_param(p, value.to(torch.float32))
        with torch.no_grad():   # the rank's partition of the parameter itself, in its own dtype
            p.ds_tensor.data.view(-1)[: value.numel()].copy_(value.view(-1).to(p.ds_tensor.dtype))
        for key in ADAM_STATES:
            safe_set_local_optimizer_state(p, state[f"{name}::{key}"].to(torch.float32), key)
    for p, st in base.state.items():
        st["step"] = _step_count(base, p, step)


def _create_adam_state(engine, base: torch.optim.Optimizer) -> None:
    """torch's AdamW creates its state at its first step, and ZeRO optimizers hand it flat fp32
    partitions; create that state the way the first step would, so the moments have a home."""
    for p in _optimizer_tensors(engine):
        st = base.state[p]
        if "exp_avg" not in st:
            st["step"] = _step_count(base, p, 0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def set_full_train_state(engine, named_params: dict[str, nn.Parameter], state: dict[str, torch.Tensor],
                         step: int) -> None:
    """Inverse of :func:`get_full_train_state` (a collective at stages >= 1), plus the optimizer step
    count that Adam's bias correction uses."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(engine)
    base = _base_optimizer(engine)
    _create_adam_state(engine, base)
    for name, p in named_params.items():
        value = state[name]
        if zero:
            safe_set_full_fp32_param(p, value.to(p.dtype))
            with gathered([p], modifier_rank=0):
                with torch.no_grad():
                    p.data.copy_(value.to(p.dtype))
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(p, state[f"{name}::{key}"], key)
        else:
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype))
            for key in ADAM_STATES:
                base.state[p][key].copy_(state[f"{name}::{key}"])
    for p, st in base.state.items():
        st["step"] = _step_count(base, p, step)


def _step_count(opt: torch.optim.Optimizer, p: torch.Tensor, step: int) -> torch.Tensor:
    """The step count as torch's Adam(W) keeps it for ``p``: on the CPU, unless the optimizer is fused
    or capturable (then fp32 on the parameter's device, where the fused kernel reads it)."""
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups) or \
        bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    if on_device:
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)
    return torch.tensor(float(step))
