"""Triton versions of the neuron-importance kernels; same signatures and results as ``reference.py``.

Imported lazily by :mod:`fedpft_kernels.backend`, only when the Triton path is used. On a machine
without a GPU the kernels run only under the interpreter, which needs ``TRITON_INTERPRET=1`` set
before ``triton`` is first imported (``triton.jit`` picks the interpreter when it decorates, and
``triton.language`` decorates its own helpers such as ``tl.zeros`` at import) and kept set while the
kernels run; the tests do that.

Both kernels are deterministic: no atomics, every output element is written by one program in a
fixed order, so the same inputs give the same bits run after run.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .reference import check_activation, check_saliency_inputs, check_stats_buffers, flat_token_mask

# Matrices one saliency launch reads: every FFN layout here fits (LLaMA: gate and up rows, down
# columns; 4 also covers W_in + W_gate + W_up + W_out). More are chained through the output.
MAX_OPERANDS = 4


# --------------------------------------------------------------------------------------------------
# Weight saliency
# --------------------------------------------------------------------------------------------------

@triton.jit
def _sumsq_operand(acc, ptr, K, stride_n, stride_k, offs_n, n_ok, BLOCK_K: tl.constexpr):
    """acc[BLOCK_N, BLOCK_K] += x**2 over one matrix, for the neurons ``offs_n``: neuron j's entries
    are ptr[j * stride_n + k * stride_k], k < K (a row matrix or a column matrix alike)."""
    base = ptr + offs_n.to(tl.int64)[:, None] * stride_n
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(base + offs_k.to(tl.int64)[None, :] * stride_k,
                    mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        acc += x * x
    return acc


@triton.jit
def _weight_saliency_kernel(out_ptr, N,
                            p0, k0, sn0, sk0, p1, k1, sn1, sk1, p2, k2, sn2, sk2, p3, k3, sn3, sk3,
                            NUM_OPERANDS: tl.constexpr, ACCUMULATE: tl.constexpr, FINAL: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per BLOCK_N neurons: sum of squares over up to 4 matrices, added to ``out`` when
    ACCUMULATE (a previous launch's partial sums), square-rooted when FINAL."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # A 2-D accumulator keeps the cross-lane reduction out of the K loop: one tl.sum at the end.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = _sumsq_operand(acc, p0, k0, sn0, sk0, offs_n, n_ok, BLOCK_K)
    if NUM_OPERANDS > 1:
        acc = _sumsq_operand(acc, p1, k1, sn1, sk1, offs_n, n_ok, BLOCK_K)
    if NUM_OPERANDS > 2:
        acc = _sumsq_operand(acc, p2, k2, sn2, sk2, offs_n, n_ok, BLOCK_K)
    if NUM_OPERANDS > 3:
        acc = _sumsq_operand(acc, p3, k3, sn3, sk3, offs_n, n_ok, BLOCK_K)
    total = tl.sum(acc, axis=1)
    if ACCUMULATE:
        total += tl.load(out_ptr + offs_n, mask=n_ok, other=0.0)
    if FINAL:
        total = tl.sqrt_rn(total)  # IEEE sqrt like torch, not the approximate tl.sqrt
    tl.store(out_ptr + offs_n, total, mask=n_ok)


def _interpreted(fn: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(fn, InterpretedFunction)


#: True when triton and these kernels were both decorated under TRITON_INTERPRET=1, so the kernels
#: can run on CPU tensors (a triton imported earlier without it leaves tl.zeros compiled-only).
INTERPRETED: bool = _interpreted(tl.zeros) and _interpreted(_weight_saliency_kernel)


def _check_launchable(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {device}) unless TRITON_INTERPRET=1 "
                           "was set before triton was first imported")


def weight_saliency(rows: Sequence[Tensor], cols: Sequence[Tensor], *, block_n: int = 32,
                    block_k: int = 128) -> Tensor:
    """Per-neuron L2 norm over row ``j`` of every matrix in ``rows`` and column ``j`` of every matrix
    in ``cols``, as float32 ``[d_ff]``. Strided inputs are read in place (no concatenation, no
    transpose copy); at most 4 matrices per launch, more are chained through the output buffer."""
    d_ff, device = check_saliency_inputs(rows, cols)
    _check_launchable(device)
    # (matrix, K, stride between neurons, stride along K): a column matrix is a row matrix with
    # its strides swapped, so one code path reads both.
    operands: List[Tuple[Tensor, int, int, int]] = (
        [(m, m.shape[1], m.stride(0), m.stride(1)) for m in rows]
        + [(m, m.shape[0], m.stride(1), m.stride(0)) for m in cols])
    out = torch.empty(d_ff, dtype=torch.float32, device=device)
    if d_ff == 0:
        return out
    grid = (triton.cdiv(d_ff, block_n),)
    chunks = [operands[i:i + MAX_OPERANDS] for i in range(0, len(operands), MAX_OPERANDS)]
    for c, chunk in enumerate(chunks):
        # Unused slots get a valid dummy pointer; NUM_OPERANDS prunes them at compile time.
        slots = chunk + [(out, 0, 0, 0)] * (MAX_OPERANDS - len(chunk))
        args = [x for slot in slots for x in slot]
        _weight_saliency_kernel[grid](out, d_ff, *args, NUM_OPERANDS=len(chunk), ACCUMULATE=c > 0,
                                      FINAL=c == len(chunks) - 1, BLOCK_N=block_n, BLOCK_K=block_k,
                                      num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# Activation statistics
# --------------------------------------------------------------------------------------------------

@triton.jit
def _act_stats_partial_kernel(act_ptr, mask_ptr, part_sum_ptr, part_zero_ptr, part_tok_ptr,
                              T, N, stride_t, stride_n, stride_mask, tokens_per_split, eps,
                              HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 1: program (i, s) reduces the tokens of split s for the neurons of column block i and
    writes its partial sums to row s of the [splits, N] workspaces (no atomics)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    col = offs_n.to(tl.int64) * stride_n
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    acc_sum = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    acc_zero = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int32)
    acc_tok = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        if HAS_MASK:
            t_ok = t_ok & (tl.load(mask_ptr + offs_t.to(tl.int64) * stride_mask, mask=t_ok, other=0) != 0)
        ok = t_ok[:, None] & n_ok[None, :]
        # Padding rows are never loaded: they cost no bandwidth and NaN there cannot leak in.
        x = tl.load(act_ptr + offs_t.to(tl.int64)[:, None] * stride_t + col[None, :], mask=ok, other=0.0)
        mag = tl.abs(x.to(tl.float32))
        acc_sum += mag
        acc_zero += (ok & (mag <= eps)).to(tl.int32)
        acc_tok += t_ok.to(tl.int32)
    row = pid_s.to(tl.int64) * N
    tl.store(part_sum_ptr + row + offs_n, tl.sum(acc_sum, axis=0), mask=n_ok)
    tl.store(part_zero_ptr + row + offs_n, tl.sum(acc_zero, axis=0), mask=n_ok)
    if pid_n == 0:
        tl.store(part_tok_ptr + pid_s, tl.sum(acc_tok, axis=0))


@triton.jit
def _act_stats_finish_kernel(part_sum_ptr, part_zero_ptr, part_tok_ptr, sum_ptr, zero_ptr, tok_ptr, N, S,
                             BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Stage 2: sum the S partial rows in order and add them into the running buffers."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    s_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_N], dtype=tl.int64)
    for s in range(0, S):
        row = s * N  # S * N is small: S is at most ~4 programs per SM divided by the column blocks
        s_acc += tl.load(part_sum_ptr + row + offs_n, mask=n_ok, other=0.0)
        z_acc += tl.load(part_zero_ptr + row + offs_n, mask=n_ok, other=0).to(tl.int64)
    tl.store(sum_ptr + offs_n, tl.load(sum_ptr + offs_n, mask=n_ok, other=0.0) + s_acc, mask=n_ok)
    tl.store(zero_ptr + offs_n, tl.load(zero_ptr + offs_n, mask=n_ok, other=0) + z_acc, mask=n_ok)
    if pid == 0:
        offs_s = tl.arange(0, BLOCK_S)
        t_acc = tl.zeros([BLOCK_S], dtype=tl.int64)
        for s0 in range(0, S, BLOCK_S):
            t_acc += tl.load(part_tok_ptr + s0 + offs_s, mask=(s0 + offs_s) < S, other=0).to(tl.int64)
        tl.store(tok_ptr, tl.load(tok_ptr) + tl.sum(t_acc, axis=0))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(tokens: int, col_blocks: int, block_t: int, device: torch.device) -> int:
    """How many token splits: enough programs to fill the GPU (about 4 per SM), never more splits
    than token blocks. On CPU (interpreter) one split, the fewest programs."""
    if device.type != "cuda":
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(tokens, block_t), triton.cdiv(target, col_blocks)))


def activation_stats_update(act: Tensor, mask: Optional[Tensor], eps: float, sum_abs: Tensor,
                            zero_count: Tensor, token_count: Tensor, *, block_t: int = 32,
                            block_n: int = 128, splits: Optional[int] = None) -> None:
    """Add the statistics of ``act`` ``[..., n]`` over the tokens where ``mask`` is non-zero (all when
    ``None``) into ``sum_abs`` (+= sum |a|), ``zero_count`` (+= #(|a| <= eps)) and ``token_count``.

    One pass over a strided ``[tokens, n]`` view (a copy only when the leading dims cannot be
    flattened as a view), then a small ordered reduction of the per-split partial sums."""
    n = check_activation(act)
    check_stats_buffers(n, act.device, sum_abs, zero_count, token_count)
    _check_launchable(act.device)
    for name, buf in (("sum_abs", sum_abs), ("zero_count", zero_count), ("token_count", token_count)):
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton kernel")
    rows = act.reshape(-1, n)
    tokens = rows.shape[0]
    if tokens == 0 or n == 0:
        # Nothing for a kernel to read; the reference does the same validation and bookkeeping.
        reference.activation_stats_update(act, mask, eps, sum_abs, zero_count, token_count)
        return
    if mask is not None:
        flat = flat_token_mask(mask, act.shape[:-1], act.device).view(torch.uint8)
        mask_arg, stride_mask = flat, flat.stride(0)
    else:
        mask_arg, stride_mask = sum_abs, 0  # never read: HAS_MASK=False prunes the load
    col_blocks = triton.cdiv(n, block_n)
    s = splits if splits is not None else _num_splits(tokens, col_blocks, block_t, act.device)
    # Whole token blocks per split, so only the last split has a ragged end.
    tokens_per_split = triton.cdiv(triton.cdiv(tokens, s), block_t) * block_t
    s = triton.cdiv(tokens, tokens_per_split)
    part_sum = torch.empty((s, n), dtype=torch.float32, device=act.device)
    part_zero = torch.empty((s, n), dtype=torch.int32, device=act.device)
    part_tok = torch.empty((s,), dtype=torch.int32, device=act.device)
    _act_stats_partial_kernel[(col_blocks, s)](
        rows, mask_arg, part_sum, part_zero, part_tok, tokens, n, rows.stride(0), rows.stride(1), stride_mask,
        tokens_per_split, float(eps), HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)
    finish_block = 256
    _act_stats_finish_kernel[(triton.cdiv(n, finish_block),)](
        part_sum, part_zero, part_tok, sum_abs, zero_count, token_count, n, s,
        BLOCK_N=finish_block, BLOCK_S=64, num_warps=4)
