"""PyTorch references for the neuron-importance kernels: the CPU path and the oracle of the tests.

Neuron ``j`` of an FFN layer owns row ``j`` of every input-side weight (``W_in``, or ``W_gate`` and
``W_up`` in a gated FFN; each ``[d_ff, d]``) and column ``j`` of the output weight (``[d, d_ff]``).
Its weight saliency is the L2 norm of all those entries together. Its activation statistics are
accumulated over the real (unpadded) tokens of the forward passes: ``sum |a|``, the number of tokens
with ``|a| <= eps`` (the numerator of APoZ, the average percentage of zeros) and the token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

STATS_KEYS = ("sum_abs", "zero_count", "token_count")


def check_saliency_inputs(rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tuple[int, torch.device]:
    """Validate the matrices of :func:`weight_saliency`; return ``(d_ff, device)``."""
    rows, cols = list(rows), list(cols)
    if not rows and not cols:
        raise ValueError("weight_saliency needs at least one matrix")
    for kind, mats in (("rows", rows), ("cols", cols)):
        for i, m in enumerate(mats):
            if not isinstance(m, Tensor) or m.dim() != 2:
                raise ValueError(f"{kind}[{i}] must be a 2-D tensor, got {getattr(m, 'shape', type(m))}")
            if not m.is_floating_point():
                raise ValueError(f"{kind}[{i}] must be floating point, got {m.dtype}")
    sizes = [m.shape[0] for m in rows] + [m.shape[1] for m in cols]
    if len(set(sizes)) != 1:
        raise ValueError(f"every matrix must have the same number of neurons (rows' dim 0, cols' dim 1), "
                         f"got {sizes}")
    devices = {m.device for m in rows + cols}
    if len(devices) != 1:
        raise ValueError(f"all matrices must be on one device, got {sorted(map(str, devices))}")
    return sizes[0], devices.pop()


# On CPU the references work in blocks of this many rows: fp32 temporaries then stay small and
# reused instead of full-size copies that page-fault on every call (measured on 2 cores: 3-13x faster
# for LLaMA-sized inputs). On a GPU one pass is cheapest: the caching allocator makes temporaries free
# and every block would cost kernel launches.
CPU_BLOCK_ROWS = 256


def _block_rows(device: torch.device, total: int) -> int:
    # 2**20 on GPU keeps per-block counts exact when summed as fp32 (below 2**24).
    return CPU_BLOCK_ROWS if device.type == "cpu" else max(1, min(total, 1 << 20))


def _add_sumsq(m: Tensor, neuron_dim: int, sumsq: Tensor) -> None:
    """sumsq[j] += sum over K of m's entries of neuron j squared (fp32), neuron j being index j of
    ``neuron_dim``; reads ``m`` once whatever its strides and dtype."""
    k_dim = 1 - neuron_dim
    block = CPU_BLOCK_ROWS
    if m.device.type != "cpu":
        # dtype=float32 upcasts while reducing: no fp32 copy of a bf16 matrix.
        sumsq += torch.linalg.vector_norm(m, ord=2, dim=k_dim, dtype=torch.float32).square()
    elif m.stride(k_dim) == 1:
        # Each neuron's entries are contiguous: reduce blocks of whole neurons.
        for start, part in zip(range(0, m.shape[neuron_dim], block), m.split(block, dim=neuron_dim)):
            norms = torch.linalg.vector_norm(part.float(), ord=2, dim=k_dim)
            sumsq[start:start + norms.numel()] += norms.square()
    else:
        # Neurons are the fast axis (a W_out column, or a transposed row matrix): reducing across
        # strided memory is slow in torch on CPU, so accumulate squares over blocks of K instead.
        kn = m if neuron_dim == 1 else m.T
        buf = torch.empty((min(block, kn.shape[0]), kn.shape[1]), dtype=torch.float32, device=kn.device)
        for part in kn.split(block, dim=0):
            sq = buf[:part.shape[0]]
            sq.copy_(part)
            sq.mul_(sq)
            sumsq += sq.sum(dim=0)


# Statistics never take part in autograd: weights are Parameters and hooked activations may require
# grad, and an in-place add of a graph-carrying value would chain every step's graph to the buffers.
@torch.no_grad()
def weight_saliency(rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
    """Per-neuron L2 norm over row ``j`` of every matrix in ``rows`` and column ``j`` of every matrix
    in ``cols``, as float32 ``[d_ff]``; accumulated in fp32 whatever the input dtype."""
    d_ff, device = check_saliency_inputs(rows, cols)
    # ||concatenation||^2 is the sum of every matrix's per-neuron squared norms, so the
    # [d_ff, sum of K] concatenation is never built.
    sumsq = torch.zeros(d_ff, dtype=torch.float32, device=device)
    for m in rows:
        _add_sumsq(m, 0, sumsq)
    for m in cols:
        _add_sumsq(m, 1, sumsq)
    return sumsq.sqrt_()


def check_activation(act: Tensor) -> int:
    """Validate ``act`` ``[..., n]``; return ``n``."""
    if act.dim() < 1 or not act.is_floating_point():
        raise ValueError(f"act must be a floating-point tensor [..., n], got {act.dtype} {tuple(act.shape)}")
    return act.shape[-1]


def check_stats_buffers(n: int, device: torch.device, sum_abs: Tensor, zero_count: Tensor,
                        token_count: Tensor) -> None:
    """Validate the running buffers of :func:`activation_stats_update` for ``n`` neurons on ``device``."""
    if sum_abs.dtype != torch.float32 or tuple(sum_abs.shape) != (n,):
        raise ValueError(f"sum_abs must be float32 [{n}], got {sum_abs.dtype} {tuple(sum_abs.shape)}")
    if zero_count.dtype != torch.int64 or tuple(zero_count.shape) != (n,):
        raise ValueError(f"zero_count must be int64 [{n}], got {zero_count.dtype} {tuple(zero_count.shape)}")
    if token_count.dtype != torch.int64 or token_count.numel() != 1 or token_count.dim() > 1:
        raise ValueError(f"token_count must be an int64 tensor of shape [] or [1], got "
                         f"{token_count.dtype} {tuple(token_count.shape)}")
    for name, buf in (("sum_abs", sum_abs), ("zero_count", zero_count), ("token_count", token_count)):
        if buf.device != device:
            raise ValueError(f"{name} is on {buf.device} but act is on {device}")


def flat_token_mask(mask: Tensor, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """``mask`` (bool or numeric; non-zero = real token) broadcast to ``lead_shape`` and flattened to a
    contiguous bool ``[tokens]``."""
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but act is on {device}")
    try:
        full = torch.broadcast_to(mask if mask.dtype == torch.bool else mask != 0, lead_shape)
    except RuntimeError as exc:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the token dims "
                         f"{tuple(lead_shape)} of act") from exc
    return full.reshape(-1).contiguous()


@torch.no_grad()
def activation_stats_update(act: Tensor, mask: Optional[Tensor], eps: float, sum_abs: Tensor,
                            zero_count: Tensor, token_count: Tensor) -> None:
    """Add the statistics of ``act`` ``[..., n]`` over the tokens where ``mask`` is non-zero (all when
    ``None``) into ``sum_abs`` (+= sum |a|), ``zero_count`` (+= #(|a| <= eps)) and ``token_count``."""
    n = check_activation(act)
    check_stats_buffers(n, act.device, sum_abs, zero_count, token_count)
    rows = act.reshape(-1, n)
    real: Optional[Tensor] = None
    tokens = rows.shape[0]
    if mask is not None:
        # Gathering the real rows (rather than multiplying by the mask) keeps NaN/inf written into
        # padding positions out of the sums, as the Triton kernel never loads them.
        real = flat_token_mask(mask, act.shape[:-1], act.device).nonzero().squeeze(1)
        tokens = real.numel()
    block = _block_rows(act.device, tokens)
    mag = torch.empty((min(block, tokens), n), dtype=torch.float32, device=act.device)
    below = torch.empty_like(mag)
    for start in range(0, tokens, block):
        stop = min(start + block, tokens)
        part = rows[start:stop] if real is None else rows.index_select(0, real[start:stop])
        m = mag[:stop - start]
        m.copy_(part)  # upcast first: bf16 |a| <= eps would round eps to bf16; the kernel compares in fp32
        m.abs_()
        sum_abs += m.sum(dim=0)
        # The indicator as 0.0/1.0 floats: summing them is ~10x faster on CPU than summing bools,
        # and a block's count (< 2**24) is exact in fp32.
        b = below[:stop - start]
        torch.le(m, eps, out=b)
        zero_count += b.sum(dim=0).to(torch.int64)
    token_count += tokens


@dataclass
class ActivationStats:
    """Running activation statistics of one FFN layer: the three buffers of
    :func:`activation_stats_update`. Updates go through the selected backend (Triton on CUDA)."""

    sum_abs: Tensor
    zero_count: Tensor
    token_count: Tensor

    @classmethod
    def zeros(cls, n: int, device: Optional[torch.device | str] = None) -> "ActivationStats":
        """Empty statistics for ``n`` neurons."""
        return cls(sum_abs=torch.zeros(n, dtype=torch.float32, device=device),
                   zero_count=torch.zeros(n, dtype=torch.int64, device=device),
                   token_count=torch.zeros((), dtype=torch.int64, device=device))

    @property
    def n(self) -> int:
        return self.sum_abs.numel()

    def update(self, act: Tensor, mask: Optional[Tensor] = None, eps: float = 0.0) -> None:
        """Accumulate one batch of activations ``[..., n]`` (``mask`` broadcastable to the token dims)."""
        # Imported here: the backend imports this module for the reference path.
        from .backend import activation_stats_update as dispatch

        dispatch(act, mask, eps, self.sum_abs, self.zero_count, self.token_count)

    def mean_abs(self) -> Tensor:
        """Mean |a| per neuron over the real tokens seen (0 before any token)."""
        return self.sum_abs / self.token_count.clamp_min(1).to(torch.float32)

    def apoz(self) -> Tensor:
        """Fraction of real tokens with |a| <= eps per neuron (0 before any token)."""
        return self.zero_count.to(torch.float32) / self.token_count.clamp_min(1).to(torch.float32)

    def __iadd__(self, other: "ActivationStats") -> "ActivationStats":
        if other.n != self.n:
            raise ValueError(f"cannot merge statistics of {other.n} neurons into {self.n}")
        self.sum_abs += other.sum_abs.to(self.sum_abs.device)
        self.zero_count += other.zero_count.to(self.zero_count.device)
        self.token_count += other.token_count.to(self.token_count.device).reshape(self.token_count.shape)
        return self

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """A new object holding the sums of both (e.g. two clients, or two workers' shares)."""
        merged = ActivationStats(self.sum_abs.clone(), self.zero_count.clone(), self.token_count.clone())
        merged += other
        return merged

    def as_dict(self) -> Dict[str, Tensor]:
        """The buffers by name (shared, not copied): SUM-reducible across ranks as they are."""
        return {"sum_abs": self.sum_abs, "zero_count": self.zero_count, "token_count": self.token_count}

    @classmethod
    def from_dict(cls, d: Dict[str, Tensor]) -> "ActivationStats":
        """Inverse of :meth:`as_dict`; checks keys, dtypes and shapes."""
        missing = [k for k in STATS_KEYS if k not in d]
        extra = [k for k in d if k not in STATS_KEYS]
        if missing or extra:
            raise ValueError(f"ActivationStats.from_dict: missing keys {missing}, unknown keys {extra}")
        stats = cls(d["sum_abs"], d["zero_count"], d["token_count"])
        check_stats_buffers(stats.n, stats.sum_abs.device, stats.sum_abs, stats.zero_count, stats.token_count)
        return stats

    def to_flat(self) -> Tensor:
        """One float64 vector ``[sum_abs, zero_count, token_count]`` (length 2n + 1) for a single
        SUM all-reduce; float64 holds the counts exactly up to 2**53."""
        return torch.cat([self.sum_abs.double(), self.zero_count.double(), self.token_count.double().reshape(1)])

    @classmethod
    def from_flat(cls, flat: Tensor) -> "ActivationStats":
        """Inverse of :meth:`to_flat` (counts are rounded back to int64)."""
        if flat.dim() != 1 or flat.numel() % 2 != 1:
            raise ValueError(f"flat statistics must be a vector of length 2n + 1, got {tuple(flat.shape)}")
        n = (flat.numel() - 1) // 2
        return cls(sum_abs=flat[:n].to(torch.float32),
                   zero_count=flat[n:2 * n].round().to(torch.int64),
                   token_count=flat[2 * n].round().to(torch.int64))
