"""Neuron-importance kernels: the PyTorch references against naive formulas, the Triton kernels
against the references (under the Triton CPU interpreter here, natively on a GPU machine), the
backend choice, and the benchmark command on tiny sizes.

Tolerances. The references and the kernels both upcast every input to fp32 before any arithmetic;
bf16/fp16 -> fp32 is exact, so for every input dtype the two compute the same sums of the same fp32
numbers and differ only in summation order. A sum of m non-negative fp32 terms (squares, |a|) is
within (m-1) * 2**-24 relative of the exact sum whatever the order; m is at most 4 * 19 + 1 = 77 here,
so 1e-5 relative holds for fp32, bf16 and fp16 inputs alike (compared with the reference on the same
low-precision input, upcast). Counts are integers and must be equal.
"""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# The interpreter must be requested before triton's first import in this process (triton.language
# decorates its own helpers at import), and stay set while kernels run. Without a GPU that is the
# only way the Triton kernels run at all; the automatic backend never picks it (tested below).
if HAVE_TRITON and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fedpft_kernels  # noqa: E402
from fedpft_kernels import ActivationStats, backend, bench, reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RTOL = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _load_triton_kernels():
    """(module, None) when the Triton kernels can run in this process, else (None, why not)."""
    if not HAVE_TRITON:
        return None, "triton is not installed"
    mod = importlib.import_module("fedpft_kernels.triton_kernels")
    if DEVICE.type != "cuda" and not mod.INTERPRETED:
        return None, ("triton was imported in this process before TRITON_INTERPRET=1 could be set; "
                      "test_triton_in_fresh_interpreter_process runs these checks instead")
    return mod, None


TK, TK_SKIP = _load_triton_kernels()
needs_triton = pytest.mark.skipif(TK is None, reason=str(TK_SKIP))


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts and ends on the automatic backend choice."""
    backend.set_backend(None)
    yield
    backend.set_backend(None)


# --------------------------------------------------------------------------------------------------
# Inputs and naive formulas
# --------------------------------------------------------------------------------------------------

def ffn_weights(d_ff: int, d: int, gated: bool, dtype: torch.dtype, seed: int = 0):
    """(rows, cols) of an FFN: 1 row matrix (W_in), or 3 when gated (W_in, W_gate, W_up: all four
    operand slots of one saliency launch), and 1 column matrix (W_out)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(d_ff, d, generator=g) for _ in range(3 if gated else 1)]
    cols = [torch.randn(d, d_ff, generator=g)]
    return [m.to(DEVICE, dtype) for m in rows], [m.to(DEVICE, dtype) for m in cols]


def naive_saliency(rows, cols) -> torch.Tensor:
    """The definition: norm of the concatenation [rows j..., columns j...], in float64."""
    return torch.cat([m.double() for m in rows] + [m.double().T for m in cols], dim=1).norm(dim=1)


def activations(shape, dtype: torch.dtype, seed: int = 0, zero_frac: float = 0.3) -> torch.Tensor:
    """Random activations with exact zeros and tiny values, so APoZ counts are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    a[torch.rand(*shape, generator=g) < zero_frac] = 0.0
    a[torch.rand(*shape, generator=g) < 0.1] *= 1e-3
    return a.to(DEVICE, dtype)


def padding_mask(batch: int, seq: int, seed: int = 0, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Right padding with random lengths (at least one sequence full, one empty when batch > 2)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    if batch > 2:
        lengths[-1] = 0
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(DEVICE, dtype)


def naive_stats(act, mask, eps):
    """Token-by-token loop over the real tokens, float64 sums, fp32 comparisons with eps."""
    n = act.shape[-1]
    flat = act.reshape(-1, n).float().cpu()
    keep = (torch.ones(flat.shape[0], dtype=torch.bool) if mask is None
            else torch.broadcast_to(mask.cpu() != 0, act.shape[:-1]).reshape(-1))
    s = torch.zeros(n, dtype=torch.float64)
    z = torch.zeros(n, dtype=torch.int64)
    t = 0
    for i in range(flat.shape[0]):
        if keep[i]:
            s += flat[i].abs().double()
            z += (flat[i].abs() <= eps).long()
            t += 1
    return s, z, t


def stats_of(impl, act, mask, eps, calls: int = 1, **kw) -> ActivationStats:
    stats = ActivationStats.zeros(act.shape[-1], DEVICE)
    for _ in range(calls):
        impl.activation_stats_update(act, mask, eps, stats.sum_abs, stats.zero_count, stats.token_count, **kw)
    return stats


def assert_stats_equal(got: ActivationStats, want: ActivationStats) -> None:
    torch.testing.assert_close(got.sum_abs, want.sum_abs, rtol=RTOL, atol=1e-6)
    assert torch.equal(got.zero_count.cpu(), want.zero_count.cpu())
    assert got.token_count.item() == want.token_count.item()


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------

@pytest.fixture(params=[256, 4], ids=["one-block", "blocks-of-4"])
def block_rows(request, monkeypatch):
    """The references' CPU block size: the default (one block at these sizes) and 4 (ragged blocks)."""
    monkeypatch.setattr(reference, "CPU_BLOCK_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_reference_saliency_is_norm_of_concatenation(gated, dtype, layout, block_rows):
    rows, cols = ffn_weights(37, 19, gated, dtype)
    if layout == "transposed":  # each matrix stored the other way round: the other CPU code path
        rows = [m.T.contiguous().T for m in rows]
        cols = [m.T.contiguous().T for m in cols]
    got = reference.weight_saliency(rows, cols)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double().cpu(), naive_saliency(rows, cols).cpu(), rtol=RTOL, atol=0)


def test_reference_saliency_validates_shapes():
    rows, cols = ffn_weights(37, 19, False, torch.float32)
    with pytest.raises(ValueError, match="same number of neurons"):
        reference.weight_saliency(rows, [cols[0][:, :36]])
    with pytest.raises(ValueError, match="at least one matrix"):
        reference.weight_saliency([], [])
    with pytest.raises(ValueError, match="2-D"):
        reference.weight_saliency([rows[0][0]], [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "broadcast"])
def test_reference_stats_match_token_loop(dtype, mask_kind, block_rows):
    act = activations((4, 6, 37), dtype)
    mask = {"none": None, "bool": padding_mask(4, 6), "int": padding_mask(4, 6, dtype=torch.int64),
            "broadcast": torch.tensor([[1], [0], [1], [1]], device=DEVICE)}[mask_kind]
    eps = 1e-2
    stats = stats_of(reference, act, mask, eps, calls=2)
    s, z, t = naive_stats(act, mask, eps)
    torch.testing.assert_close(stats.sum_abs.double().cpu(), 2 * s, rtol=RTOL, atol=1e-6)
    assert torch.equal(stats.zero_count.cpu(), 2 * z)
    assert stats.token_count.item() == 2 * t


def test_reference_stats_ignore_nan_in_padding_and_check_shapes():
    act = activations((3, 5, 8), torch.float32)
    mask = padding_mask(3, 5)
    act[~mask] = float("nan")
    stats = stats_of(reference, act, mask, 0.0)
    assert torch.isfinite(stats.sum_abs).all()
    token_count = torch.zeros(1, dtype=torch.int64, device=DEVICE)  # shape [1] is accepted too
    reference.activation_stats_update(act, mask, 0.0, stats.sum_abs, stats.zero_count, token_count)
    assert token_count.item() == int(mask.sum())
    with pytest.raises(ValueError, match="does not broadcast"):
        reference.activation_stats_update(act, mask[:, :4], 0.0, stats.sum_abs, stats.zero_count, token_count)
    with pytest.raises(ValueError, match="sum_abs must be float32"):
        reference.activation_stats_update(act, None, 0.0, stats.sum_abs[:7], stats.zero_count, token_count)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_statistics_stay_out_of_autograd(impl):
    if impl == "triton" and TK is None:
        pytest.skip(str(TK_SKIP))
    mod = reference if impl == "reference" else TK
    rows, cols = ffn_weights(37, 19, False, torch.float32)
    params = [torch.nn.Parameter(m) for m in rows + cols]
    assert not mod.weight_saliency(params[:1], params[1:]).requires_grad
    act = activations((2, 3, 37), torch.float32).requires_grad_()
    stats = stats_of(mod, act * 2, None, 0.0)
    assert not any(t.requires_grad for t in stats.as_dict().values())


def test_activation_stats_object_roundtrips_and_merges():
    a, b = activations((2, 5, 11), torch.float32, seed=1), activations((3, 4, 11), torch.float32, seed=2)
    ma, mb = padding_mask(2, 5, seed=1), padding_mask(3, 4, seed=2)
    sa, sb = ActivationStats.zeros(11, DEVICE), ActivationStats.zeros(11, DEVICE)
    sa.update(a, ma)
    sb.update(b, mb)
    both = ActivationStats.zeros(11, DEVICE)
    both.update(a, ma)
    both.update(b, mb)
    merged = sa.merge(sb)
    assert_stats_equal(merged, both)
    assert sa.token_count.item() == int(ma.sum())  # merge does not modify its operands
    sa += sb
    assert_stats_equal(sa, both)
    s, z, t = naive_stats(a, ma, 0.0)
    s2, z2, t2 = naive_stats(b, mb, 0.0)
    torch.testing.assert_close(both.mean_abs().double().cpu(), (s + s2) / (t + t2), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(both.apoz().double().cpu(), (z + z2).double() / (t + t2), rtol=RTOL, atol=0)
    assert_stats_equal(ActivationStats.from_dict(both.as_dict()), both)
    assert_stats_equal(ActivationStats.from_flat(both.to_flat()), both)
    assert both.to_flat().shape == (2 * 11 + 1,)
    empty = ActivationStats.zeros(11, DEVICE)
    assert torch.equal(empty.mean_abs(), torch.zeros(11, device=DEVICE))  # no division by zero tokens
    with pytest.raises(ValueError, match="unknown keys"):
        ActivationStats.from_dict({**both.as_dict(), "extra": both.sum_abs})
    with pytest.raises(ValueError, match="cannot merge"):
        both.merge(ActivationStats.zeros(12, DEVICE))


# --------------------------------------------------------------------------------------------------
# Triton kernels vs references
# --------------------------------------------------------------------------------------------------

def _saliency_layouts(gated: bool, dtype: torch.dtype, layout: str):
    """Weights of a 37-neuron FFN of width 19, contiguous or read through strided views."""
    rows, cols = ffn_weights(37, 19, gated, dtype)
    if layout == "strided":
        # A row matrix stored transposed ([d, d_ff] memory read as [d_ff, d]: strides (1, d_ff)) and
        # a column matrix that is every other column of a wider one (strides (2 d_ff', 2)).
        rows[0] = rows[0].T.contiguous().T
        wide = torch.zeros(19, 74, device=DEVICE, dtype=dtype)
        wide[:, ::2] = cols[0]
        cols[0] = wide[:, ::2]
        assert not rows[0].is_contiguous() and not cols[0].is_contiguous()
    return rows, cols


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_saliency_matches_reference(dtype, gated, layout):
    rows, cols = _saliency_layouts(gated, dtype, layout)
    # The reference on the same low-precision values, upcast: the kernel must agree to fp32 order
    # of summation (module docstring), not merely to bf16 precision.
    want = reference.weight_saliency([m.float() for m in rows], [m.float() for m in cols])
    for blocks in ({}, {"block_n": 16, "block_k": 8}):  # default tiles, and ragged multi-tile ones
        got = TK.weight_saliency(rows, cols, **blocks)
        assert got.dtype == torch.float32 and got.shape == (37,)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


@needs_triton
def test_triton_saliency_chains_more_than_four_matrices():
    rows, cols = ffn_weights(37, 19, True, torch.float32)
    rows2, cols2 = ffn_weights(37, 5, True, torch.bfloat16, seed=1)
    rows, cols = rows + rows2[:1], cols + cols2  # 6 matrices of mixed widths and dtypes: 2 launches
    got = TK.weight_saliency(rows, cols, block_n=16, block_k=8)
    torch.testing.assert_close(got.double(), naive_saliency(rows, cols).to(got.device), rtol=RTOL, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["3d-mask", "2d-nomask", "strided-cols", "transposed", "broadcast-mask"])
def test_triton_stats_match_reference(dtype, case):
    eps = 1e-2
    if case == "3d-mask":
        act, mask = activations((3, 5, 37), dtype), padding_mask(3, 5)
    elif case == "2d-nomask":
        act, mask = activations((13, 37), dtype), None
    elif case == "strided-cols":  # last dim with stride 2: read in place through strides
        act, mask = activations((3, 5, 74), dtype)[..., ::2], padding_mask(3, 5, dtype=torch.int64)
    elif case == "transposed":  # [seq, batch, n] view of [batch, seq, n]: flattening needs a copy
        act = activations((3, 5, 37), dtype).transpose(0, 1)
        mask = padding_mask(3, 5).T
    else:
        act, mask = activations((4, 13, 37), dtype), torch.tensor([[1], [0], [1], [1]], device=DEVICE)
    if mask is not None:  # written through the view, so strided cases stay strided
        act[torch.broadcast_to(mask == 0, act.shape[:-1])] = float("nan")  # never read by either
    want = stats_of(reference, act.float(), mask, eps, calls=3)
    # Default tiles (one tile, one split on CPU), then ragged tiles with 1, 2 and 3 token splits.
    for kw in ({}, {"block_t": 4, "block_n": 16, "splits": 1}, {"block_t": 4, "block_n": 16, "splits": 2},
               {"block_t": 2, "block_n": 8, "splits": 3}):
        assert_stats_equal(stats_of(TK, act, mask, eps, calls=3, **kw), want)


@needs_triton
def test_triton_stats_edge_cases():
    # eps = 0 counts exact zeros only; a single token ([n]); zero tokens; token_count of shape [1].
    act = activations((2, 3, 37), torch.float32)
    assert_stats_equal(stats_of(TK, act, None, 0.0), stats_of(reference, act, None, 0.0))
    single = act[0, 0]
    assert_stats_equal(stats_of(TK, single, None, 0.0), stats_of(reference, single, None, 0.0))
    empty = act[:, :0]
    assert_stats_equal(stats_of(TK, empty, torch.ones(2, 0, dtype=torch.bool, device=DEVICE), 0.0),
                       ActivationStats.zeros(37, DEVICE))
    s = ActivationStats.zeros(37, DEVICE)
    tok1 = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    TK.activation_stats_update(act, padding_mask(2, 3), 0.0, s.sum_abs, s.zero_count, tok1)
    assert tok1.item() == int(padding_mask(2, 3).sum())


@needs_triton
def test_forced_triton_backend_dispatches_to_kernels(monkeypatch):
    rows, cols = ffn_weights(37, 19, True, torch.float32)
    act, mask = activations((3, 5, 37), torch.float32), padding_mask(3, 5)
    backend.set_backend("triton")
    assert backend.implementation(DEVICE) is TK
    got = fedpft_kernels.weight_saliency(rows, cols)
    stats = ActivationStats.zeros(37, DEVICE)
    stats.update(act, mask, 1e-2)
    backend.set_backend(None)
    monkeypatch.setenv("FEDPFT_KERNELS", "triton")
    backend.set_backend(None)  # re-reads the environment
    assert backend.select_backend() == "triton" and backend.select_backend("cpu") == "triton"
    backend.set_backend("reference")
    torch.testing.assert_close(got, fedpft_kernels.weight_saliency(rows, cols), rtol=RTOL, atol=0)
    assert_stats_equal(stats, stats_of(reference, act, mask, 1e-2))


# --------------------------------------------------------------------------------------------------
# Backend choice, lazy import, GPU compilation
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the automatic choice on a machine without a GPU")
def test_automatic_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("FEDPFT_KERNELS", raising=False)
    backend.set_backend(None)
    # Even with TRITON_INTERPRET=1 exported (as in this process), the interpreter is never automatic.
    assert backend.select_backend() == "reference"
    assert backend.select_backend(torch.device("cpu")) == "reference"
    assert backend.implementation("cpu") is reference
    backend.set_backend("triton")
    assert backend.select_backend() == "triton"
    backend.set_backend(None)
    assert backend.select_backend() == "reference"
    monkeypatch.setenv("FEDPFT_KERNELS", "reference")
    backend.set_backend(None)
    assert backend.select_backend("cuda") == "reference"
    monkeypatch.setenv("FEDPFT_KERNELS", "fast")
    backend.set_backend(None)
    with pytest.raises(ValueError, match="FEDPFT_KERNELS"):
        backend.select_backend()
    with pytest.raises(ValueError, match="backend must be"):
        backend.set_backend("cuda")


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FEDPFT_KERNELS")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra})
    return env


def test_package_works_without_triton():
    """With triton unimportable, the package imports, dispatches to the reference, and reports why."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, fedpft_kernels as fk
rows = [torch.randn(7, 3)]; cols = [torch.randn(3, 7)]
assert fk.weight_saliency(rows, cols).shape == (7,)
s = fk.ActivationStats.zeros(7); s.update(torch.randn(2, 4, 7), torch.ones(2, 4)); assert s.token_count.item() == 8
assert fk.select_backend() == "reference" and not fk.triton_status()["installed"]
assert "fedpft_kernels.triton_kernels" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(TK is not None, reason="the interpreter checks ran in this process")
def test_triton_in_fresh_interpreter_process():
    """Fallback when something imported triton before this module: rerun the Triton checks in a
    process where TRITON_INTERPRET=1 precedes every import."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                          cwd=REPO, env=_child_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fedpft_kernels import triton_kernels as K

def compile_for(fn, types, consts, arch):
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
    assert ".entry " + fn.__name__ in k.asm["ptx"] and k.asm["cubin"]

for arch, dt in ((90, "bf16"), (80, "fp32"), (80, "fp16")):
    # Unit strides are specialised to constants by the launcher; mirror that for rows and columns.
    compile_for(K._weight_saliency_kernel, {"out_ptr": "*fp32", **{f"p{i}": f"*{dt}" for i in range(4)}},
                {"NUM_OPERANDS": 4, "ACCUMULATE": True, "FINAL": True, "BLOCK_N": 32, "BLOCK_K": 128,
                 "sk0": 1, "sk1": 1, "sk2": 1, "sn3": 1}, arch)
    compile_for(K._act_stats_partial_kernel,
                {"act_ptr": f"*{dt}", "mask_ptr": "*u8", "part_sum_ptr": "*fp32", "part_zero_ptr": "*i32",
                 "part_tok_ptr": "*i32", "eps": "fp32"},
                {"HAS_MASK": dt != "fp32", "BLOCK_T": 32, "BLOCK_N": 128, "stride_n": 1}, arch)
compile_for(K._act_stats_finish_kernel,
            {"part_sum_ptr": "*fp32", "part_zero_ptr": "*i32", "part_tok_ptr": "*i32", "sum_ptr": "*fp32",
             "zero_ptr": "*i64", "tok_ptr": "*i64"}, {"BLOCK_N": 256, "BLOCK_S": 64}, 90)
print("compiled")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_gpu(tmp_path):
    """The interpreter is lenient (types, loop-carried values): compile the kernels to PTX and cubin
    for sm_80 and sm_90 with Triton's own compiler and ptxas, which needs no GPU."""
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in the triton wheel or on PATH")
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHECK], cwd=REPO,
                          env=_child_env(TRITON_CACHE_DIR=str(tmp_path)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# --------------------------------------------------------------------------------------------------
# Benchmark command
# --------------------------------------------------------------------------------------------------

TINY = ["--sizes", "sal:37x19", "sal:37x19:gated", "act:2x7x37", "--dtypes", "fp32", "bf16",
        "--warmup", "1", "--repeat", "2", "--device", "cpu"]


def test_bench_tiny_cpu_reports_reference_only(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out), *TINY]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "triton", "implementations", "triton_skipped", "warmup",
                "repeat", "results"):
        assert key in report
    assert report["implementations"] == ["reference"] and "cuda" in report["triton_skipped"].lower()
    assert [r["spec"] for r in report["results"]] == ["sal:37x19"] * 2 + ["sal:37x19:gated"] * 2 + ["act:2x7x37"] * 2
    for r in report["results"]:
        assert {"kernel", "dtype", "shapes", "ms", "speedup", "max_rel_err"} <= set(r)
        assert r["ms"]["reference"] > 0 and r["speedup"] is None
    assert report["results"][2]["shapes"]["rows"] == [[37, 19], [37, 19]]
    with pytest.raises(SystemExit):
        bench.main(["--out", str(out), "--sizes", "sal:37"])


@needs_triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="--interpret is the CPU path of the bench")
def test_bench_tiny_interpreted_triton(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out), *TINY, "--interpret"]) == 0
    report = json.loads(out.read_text())
    assert report["implementations"] == ["reference", "triton"] and report["triton_skipped"] is None
    for r in report["results"]:
        assert r["speedup"] > 0 and r["max_rel_err"]["triton"] < RTOL
        if r["kernel"] == "activation_stats":
            assert r["count_mismatches"]["triton"] == 0
