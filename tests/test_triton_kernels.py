"""The Triton kernels (backend `triton`) against reference.py.

On a CPU-only machine they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1
before triton is imported), so shapes stay small; on a GPU machine the same tests run on CUDA
tensors with compiled kernels.  Quantize / dequantize are compared bit for bit (torch.equal);
matmuls by ‖out − ref‖/‖ref‖ against a float64 reference (fp32 < 1e-5, bf16/fp16 < 1e-2).
Every test checks that the triton backend served the call (no silent fallback).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nf4kit
from nf4kit import backends, ops
from nf4kit import format as fmt
from nf4kit import reference as ref

from conftest import assert_ran

_mod = backends.get("triton")
pytestmark = pytest.mark.skipif(_mod is None or not _mod.is_available(),
                                reason="triton backend unavailable (no triton, or no GPU and not interpreting)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _triton_first():
    with nf4kit.use_backend("triton"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


def _rel(out: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double().cpu()
    return float((out.detach().double().cpu() - want).norm() / want.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- quantize / dequantize
QUANT_CASES = [
    # shape, blocksize, quant_type, dtype
    ((1,), 64, "nf4", torch.float32),
    ((7,), 32, "fp4", torch.bfloat16),
    ((33, 65), 64, "nf4", torch.bfloat16),     # odd count: padded last nibble; blocks cross rows
    ((33, 65), 128, "fp4", torch.float16),
    ((5, 96), 32, "nf4", torch.float16),
    ((3, 1000), 256, "nf4", torch.float32),
    ((2, 700), 1024, "fp4", torch.float32),
    ((4500,), 4096, "nf4", torch.bfloat16),    # blocksize above the tile: a tail block of 404
    ((600, 7), 2048, "fp4", torch.bfloat16),
]


@pytest.mark.parametrize("shape,blocksize,quant_type,dtype", QUANT_CASES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_quantize_dequantize_4bit_bit_exact(shape, blocksize, quant_type, dtype, nested):
    A = _rand(shape, dtype, seed=hash((shape, blocksize)) % 1000, scale=3.0)
    if A.numel() > 2 * blocksize:
        A.view(-1)[blocksize:2 * blocksize] = 0  # an all-zero block: codes of 0.0, absmax 0
    packed, qs = nf4kit.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    assert_ran("quantize_4bit", "triton")
    want_p, want_a = ref.quantize_4bit(A.cpu(), blocksize, quant_type)
    assert torch.equal(packed.reshape(-1).cpu(), want_p)
    if nested:
        assert_ran("quantize_blockwise", "triton")
        q, nest, off = ref.double_quantize(want_a)
        assert torch.equal(qs.absmax.cpu(), q)
        assert torch.equal(qs.state2.absmax.cpu(), nest)
        assert torch.equal(qs.offset.cpu(), off)
        state = (q, nest, fmt.dynamic_map(), off)
    else:
        assert torch.equal(qs.absmax.cpu(), want_a)
        state = (want_a, None, None, None)
    for out_dtype in DTYPES:
        out = nf4kit.dequantize_4bit(packed, qs, dtype=out_dtype)
        assert_ran("dequantize_4bit", "triton")
        want = ref.dequantize_4bit(want_p, *state, blocksize, quant_type, A.numel(), out_dtype).view(shape)
        assert out.dtype == out_dtype and out.shape == A.shape
        assert torch.equal(out.cpu(), want), f"dequantize to {out_dtype} differs from the reference"


def test_dequantize_4bit_tiny_and_denormal_scales():
    """Subnormal inputs (absmax below FLT_MIN, clamped at 1e-38) and mixed magnitudes."""
    A = torch.tensor([1e-40, -3e-41, 0.0, 2e-39] * 16 + [1e30, -2.5e29] * 32, dtype=torch.float32, device=DEVICE)
    for quant_type in ("nf4", "fp4"):
        packed, qs = nf4kit.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type=quant_type)
        want_p, want_a = ref.quantize_4bit(A.cpu(), 64, quant_type)
        assert torch.equal(packed.reshape(-1).cpu(), want_p) and torch.equal(qs.absmax.cpu(), want_a)
        out = nf4kit.dequantize_4bit(packed, qs)
        assert torch.equal(out.cpu(), ref.dequantize_4bit(want_p, want_a, None, None, None, 64, quant_type,
                                                          A.numel(), torch.float32))


@pytest.mark.parametrize("n,blocksize,dtype", [(1, 256, torch.float32), (700, 256, torch.bfloat16),
                                               (513, 64, torch.float16), (3000, 2048, torch.float32)])
def test_blockwise_8bit_bit_exact(n, blocksize, dtype):
    A = _rand((n,), dtype, seed=n)
    q, qs = nf4kit.quantize_blockwise(A, blocksize=blocksize)
    assert_ran("quantize_blockwise", "triton")
    code = fmt.dynamic_map()
    want_q, want_a = ref.quantize_blockwise(A.cpu(), code, blocksize)
    assert torch.equal(q.reshape(-1).cpu(), want_q) and torch.equal(qs.absmax.reshape(-1).cpu(), want_a)
    for out_dtype in DTYPES:
        out = nf4kit.dequantize_blockwise(q, qs, dtype=out_dtype)
        assert_ran("dequantize_blockwise", "triton")
        assert torch.equal(out.reshape(-1).cpu(), ref.dequantize_blockwise(want_q, want_a, code, blocksize, out_dtype))


# ----------------------------------------------------------------------------- matmuls
# (M, N, K, blocksize): K % blocksize != 0 -> blocks cross rows; odd K -> rows start mid-byte;
# K = 40 with blocksize 32 -> runs of a tile straddle blocks (per-element scale path).
MM_SHAPES = [
    (1, 40, 64, 64),
    (1, 33, 96, 64),
    (1, 47, 95, 32),
    (3, 33, 96, 64),
    (8, 47, 95, 32),
    (5, 30, 40, 32),
    (20, 40, 64, 64),
    (24, 33, 96, 128),
    (17, 47, 95, 32),
]


def _quantized_weight(N, K, blocksize, quant_type, nested, seed):
    W = torch.randn(N, K, generator=_gen(seed)).to(DEVICE)
    with nf4kit.use_backend("torch"):
        packed, qs = nf4kit.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        Wq = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double().cpu()  # the exact 4-bit weight
    return packed, qs, Wq


def _mm_case(M, N, K, blocksize, dtype, nested, lora, bias, seed=0, quant_type="nf4"):
    packed, qs, Wq = _quantized_weight(N, K, blocksize, quant_type, nested, seed)
    x = _rand((M, K), dtype, seed + 1)
    b = _rand((N,), dtype, seed + 2) if bias else None
    r = 7 if lora else 0
    A = _rand((r, K), dtype, seed + 3, 0.2) if lora else None
    B = _rand((N, r), dtype, seed + 4, 0.2) if lora else None
    return packed, qs, Wq, x, b, A, B


@pytest.fixture(params=["auto", "fused"])
def mm_path(request, monkeypatch):
    """'auto': M <= 16 takes the split-K decode kernel; 'fused': force the fused tile kernel."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "GEMV_MAX_M", 0 if request.param == "fused" else 16)
    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)  # test the Triton kernels, not cuBLAS
    monkeypatch.setattr(tkm, "FUSED_BACKWARD", True)
    return request.param


@pytest.mark.parametrize("M,N,K,blocksize", MM_SHAPES, ids=[f"{m}x{n}x{k}-bs{b}" for m, n, k, b in MM_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_matmul_4bit_forward(M, N, K, blocksize, dtype, mm_path):
    if mm_path == "fused" and M > 16:
        pytest.skip("M > 16 takes the fused kernel in 'auto' already")
    nested = (M + K) % 2 == 0
    lora = bias = (N % 2 == 1) or dtype == torch.bfloat16
    quant_type = "fp4" if K == 40 else "nf4"
    packed, qs, Wq, x, b, A, B = _mm_case(M, N, K, blocksize, dtype, nested, lora, bias, seed=M * N,
                                          quant_type=quant_type)
    y = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *ops.state_args(qs), blocksize, quant_type, N, K, b, A, B, 0.75)
    assert_ran("matmul_4bit", "triton")
    want = x.double().cpu() @ Wq.t()
    if lora:
        want += 0.75 * (x.double().cpu() @ A.double().cpu().t()) @ B.double().cpu().t()
    if bias:
        want += b.double().cpu()
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel(y, want) < TOL[dtype]


@pytest.mark.parametrize("M,N,K,blocksize", MM_SHAPES, ids=[f"{m}x{n}x{k}-bs{b}" for m, n, k, b in MM_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_matmul_4bit_backward_input(M, N, K, blocksize, dtype, monkeypatch):
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)  # the fused backward kernel for every M
    monkeypatch.setattr(tkm, "FUSED_BACKWARD", True)
    nested = (M + N) % 2 == 1
    lora = dtype != torch.float16 or K % 2 == 1
    packed, qs, Wq, _, _, A, B = _mm_case(M, N, K, blocksize, dtype, nested, lora, False, seed=M + N)
    dy = _rand((M, N), dtype, seed=K)
    dx = ops.matmul_4bit_backward_input(dy, fmt.packed_as_bytes(packed), *ops.state_args(qs), blocksize, "nf4", N, K,
                                        A, B, 1.5)
    assert_ran("matmul_4bit_backward_input", "triton")
    want = dy.double().cpu() @ Wq
    if lora:
        want += 1.5 * (dy.double().cpu() @ B.double().cpu()) @ A.double().cpu()
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert _rel(dx, want) < TOL[dtype]


def test_matmul_4bit_splitk_and_lora_rank(monkeypatch):
    """The split-K reduce kernel (2 partials) and a LoRA rank that is a power of two (16)."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)
    monkeypatch.setattr(tkm, "GEMV_MAX_M", 16)
    M, N, K, bs = 2, 48, 128, 64
    packed, qs, Wq = _quantized_weight(N, K, bs, "nf4", True, seed=5)
    x = _rand((M, K), torch.float32, 6)
    A = _rand((16, K), torch.float32, 7, 0.1)
    B = _rand((N, 16), torch.float32, 8, 0.1)
    b = _rand((N,), torch.float32, 9)
    y = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *ops.state_args(qs), bs, "nf4", N, K, b, A, B, 2.0)
    assert_ran("matmul_4bit", "triton")
    want = x.double().cpu() @ Wq.t() + 2.0 * (x.double().cpu() @ A.double().cpu().t()) @ B.double().cpu().t() \
        + b.double().cpu()
    assert _rel(y, want) < 1e-5


@pytest.mark.parametrize("K,split,dtype", [(96, 2, torch.bfloat16), (160, 1, torch.float32), (224, 3, torch.float16)])
def test_gemv_word_path_prefetching_two_tiles(K, split, dtype, monkeypatch):
    """The M = 1 word path with two K-steps of W in flight (PREFETCH=2, a sweep config): every
    step multiplied once, in order, including the split ends where the prefetch runs past."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)
    N, bs = 37, 32
    packed, qs, Wq = _quantized_weight(N, K, bs, "nf4", K % 64 == 32, seed=K)
    x = _rand((1, K), dtype, K + 1)
    cfg = tkm._cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, PREFETCH=2, warps=4, stages=1)
    with tkm.force_config("gemv", cfg):
        y = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *ops.state_args(qs), bs, "nf4", N, K, None, None, None,
                            1.0)
    assert_ran("matmul_4bit", "triton")
    assert _rel(y, x.double().cpu() @ Wq.t()) < TOL[dtype]


@pytest.mark.parametrize("N,K,bs,quant_type,nested,dtype", [
    (37, 64, 32, "nf4", True, torch.bfloat16),     # one K-tile per row; several passes over row blocks
    (21, 192, 64, "fp4", False, torch.float32),    # 3 K-tiles; the last row block is partial
    (5, 128, 128, "nf4", False, torch.float16),    # fewer row blocks than programs ask for
    (19, 64, 64, "nf4", True, torch.float32)])
def test_gemv_stream_kernel(N, K, bs, quant_type, nested, dtype, monkeypatch):
    """The memory-order M = 1 kernel (GEMV_STREAM, experimental): every (row, K-tile) dot written
    once into its partial slice, summed in order with bias and LoRA, on odd row counts and K-tiles
    shared by several row blocks.  K not a multiple of the K-tile keeps the word path."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)
    monkeypatch.setattr(tkm, "GEMV_STREAM", True)
    monkeypatch.setattr(tkm, "STREAM_CONFIG", dict(BLOCK_N=4, BLOCK_K=64, warps=4, programs_per_sm=2))
    tpr = K // 64
    progs = tkm._stream_programs(N, K, torch.device(DEVICE))
    assert progs % tpr == 0 and progs >= tpr
    packed, qs, Wq, x, b, A, B = _mm_case(1, N, K, bs, dtype, nested, lora=True, bias=True, seed=N + K,
                                          quant_type=quant_type)
    y = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *ops.state_args(qs), bs, quant_type, N, K, b, A, B, 0.5)
    assert_ran("matmul_4bit", "triton")
    want = x.double().cpu() @ Wq.t() + b.double().cpu() \
        + 0.5 * (x.double().cpu() @ A.double().cpu().t()) @ B.double().cpu().t()
    assert y.shape == (1, N) and y.dtype == dtype
    assert _rel(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gemv_stream_pdl_reduction_gives_the_same_bits(dtype, monkeypatch):
    """STREAM_PDL (the default on sm_90+): the stream kernel's reduction launched with programmatic
    dependent launch runs the same kernels in the same order, so its output equals the ordinary launch's
    bit for bit, bias and LoRA included.  It is on only on a GPU of compute capability 9.0+ (and a
    Triton with grid dependency control), never under the interpreter, where the setting is ignored."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)
    monkeypatch.setattr(tkm, "GEMV_STREAM", True)
    if DEVICE == "cpu":  # small tiles for the interpreter
        monkeypatch.setattr(tkm, "STREAM_CONFIG", dict(BLOCK_N=4, BLOCK_K=64, warps=4, programs_per_sm=2))
    N, K = (1037, 3 * tkm.STREAM_CONFIG["BLOCK_K"]) if DEVICE == "cuda" else (21, 192)
    packed, qs, Wq, x, b, A, B = _mm_case(1, N, K, 64, dtype, True, lora=True, bias=True, seed=N + K + 5)
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    out = {}
    for pdl in (False, True):
        monkeypatch.setattr(tkm, "STREAM_PDL", pdl)
        assert tkm._stream_pdl(torch.device(DEVICE)) == (pdl and hopper and tkm._HAS_GDC)
        out[pdl] = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *ops.state_args(qs), 64, "nf4", N, K, b, A, B,
                                   0.5)
        assert_ran("matmul_4bit", "triton")
    want = x.double().cpu() @ Wq.t() + b.double().cpu() \
        + 0.5 * (x.double().cpu() @ A.double().cpu().t()) @ B.double().cpu().t()
    assert _rel(out[True], want) < TOL[dtype]
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_4bit_autograd_through_public_api(dtype, monkeypatch):
    """nf4kit.matmul_4bit with leading dims: forward and dx through the triton kernels,
    grads of x, bias, lora_A, lora_B against float64 autograd."""
    from nf4kit.triton_kernels import matmul as tkm

    monkeypatch.setattr(tkm, "DEQUANT_GEMM_MIN_M", 0)
    monkeypatch.setattr(tkm, "FUSED_BACKWARD", True)
    N, K, bs = 36, 80, 64
    packed, qs, Wq = _quantized_weight(N, K, bs, "nf4", True, seed=11)
    x = _rand((2, 3, K), dtype, 12).requires_grad_()
    b = _rand((N,), dtype, 13).requires_grad_()
    A = _rand((4, K), dtype, 14, 0.2).requires_grad_()
    B = _rand((N, 4), dtype, 15, 0.2).requires_grad_()
    y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=0.5)
    assert_ran("matmul_4bit", "triton")
    g = _rand(y.shape, dtype, 16)
    y.backward(g)
    assert_ran("matmul_4bit_backward_input", "triton")
    xd, bd, Ad, Bd = (t.detach().double().cpu().requires_grad_() for t in (x, b, A, B))
    yd = xd @ Wq.t() + bd + 0.5 * (xd @ Ad.t()) @ Bd.t()
    yd.backward(g.double().cpu())
    tol = TOL[dtype]
    assert _rel(y, yd.detach()) < tol
    for got, want in ((x.grad, xd.grad), (b.grad, bd.grad), (A.grad, Ad.grad), (B.grad, Bd.grad)):
        assert _rel(got, want) < tol


@pytest.mark.parametrize("M", [1, 3, 40])
def test_matmul_4bit_default_regimes(M):
    """The default routing (on CUDA: gemv for M = 1, dequantize + cuBLAS otherwise; under the
    interpreter the Triton kernels), forward and dx, with LoRA and bias."""
    N, K, bs = 24, 64, 64
    packed, qs, Wq = _quantized_weight(N, K, bs, "nf4", True, seed=M)
    x = _rand((M, K), torch.bfloat16, 1)
    b = _rand((N,), torch.bfloat16, 2)
    A = _rand((4, K), torch.bfloat16, 3, 0.2)
    B = _rand((N, 4), torch.bfloat16, 4, 0.2)
    pk = fmt.packed_as_bytes(packed)
    y = ops.matmul_4bit(x, pk, *ops.state_args(qs), bs, "nf4", N, K, b, A, B, 0.5)
    assert_ran("matmul_4bit", "triton")
    xd = x.double().cpu()
    want = xd @ Wq.t() + 0.5 * (xd @ A.double().cpu().t()) @ B.double().cpu().t() + b.double().cpu()
    assert _rel(y, want) < 1e-2
    dy = _rand((M, N), torch.bfloat16, 5)
    dx = ops.matmul_4bit_backward_input(dy, pk, *ops.state_args(qs), bs, "nf4", N, K, A, B, 0.5)
    assert_ran("matmul_4bit_backward_input", "triton")
    dyd = dy.double().cpu()
    assert _rel(dx, dyd @ Wq + 0.5 * (dyd @ B.double().cpu()) @ A.double().cpu()) < 1e-2


def test_unsupported_returns_notimplemented():
    """A LoRA rank above the kernels' limit falls through to the next backend."""
    mod = backends.get("triton")
    N, K = 8, 32
    packed, qs, _ = _quantized_weight(N, K, 32, "nf4", False, seed=3)
    x = _rand((1, K), torch.float32, 1)
    A = torch.zeros(300, K, device=DEVICE)
    B = torch.zeros(N, 300, device=DEVICE)
    assert mod.matmul_4bit(x, packed.reshape(-1), qs.absmax, None, None, None, 32, "nf4", N, K, None, A, B,
                           1.0) is NotImplemented
    assert mod.quantize_blockwise(x, fmt.dynamic_map().to(DEVICE), 96) is NotImplemented


# ----------------------------------------------------------------------------- static GPU code view
def test_registry_lists_every_kernel():
    from nf4kit.triton_kernels import registry

    specs = registry.kernel_specs(90)
    names = {s.fn.__name__ if hasattr(s.fn, "__name__") else s.fn.fn.__name__ for s in specs}
    assert {"_quantize_4bit_kernel", "_dequantize_4bit_kernel", "_quantize_blockwise_kernel",
            "_dequantize_blockwise_kernel", "_fused_matmul_kernel", "_gemv_kernel",
            "_splitk_reduce_kernel", "_gemv_stream_kernel"} <= names
    assert len({s.name for s in specs}) == len(specs)
    assert len(registry.kernel_specs(80)) > 0


_STATIC_CHECK = textwrap.dedent("""
    import re
    from nf4kit.triton_kernels import registry
    for spec in registry.kernel_specs(90):
        if not spec.exact:
            continue
        ptx = registry.compile_spec(spec, 90).asm["ptx"]
        assert not re.search(r"\\bfma\\.", ptx), spec.name + ": FMA in a bit-exact kernel"
        assert not re.search(r"div\\.(approx|full)|rcp\\.approx|\\.ftz", ptx), spec.name + ": inexact division/ftz"
        if spec.name.startswith("quantize"):
            assert "div.rn.f32" in ptx, spec.name
        if spec.name.startswith("dequantize_4bit"):
            assert "cvt.rn.bf16" in ptx, spec.name
            assert re.search(r"ld\\.global(\\.nc)?\\.v4", ptx) and "st.global.v4" in ptx, spec.name + ": 16-byte access"
    print("STATIC-OK")
""")


_PDL_CHECK = textwrap.dedent("""
    from nf4kit.triton_kernels import registry
    specs = {s.name: s for s in registry.kernel_specs(90)}
    assert not any(name.endswith("_pdl") for name in (s.name for s in registry.kernel_specs(80)))
    if "splitk_reduce_pdl" not in specs:
        print("NO-GDC")
        raise SystemExit(0)
    wait = registry.compile_spec(specs["splitk_reduce_pdl"], 90)
    signal = registry.compile_spec(specs["gemv_stream_m1_pdl"], 90)
    plain = registry.compile_spec(specs["splitk_reduce"], 90)
    assert "griddepcontrol.wait" in wait.asm["ptx"], "the PDL reduction does not wait"
    assert "griddepcontrol.launch_dependents" in signal.asm["ptx"], "the PDL stream kernel does not signal"
    assert "griddepcontrol" not in plain.asm["ptx"]
    assert getattr(wait.metadata, "launch_pdl", True) and not getattr(plain.metadata, "launch_pdl", False)
    print("PDL-OK")
""")


def test_stream_pdl_variants_compile_with_grid_dependency_control():
    """STREAM_PDL's kernels, compiled for sm_90 here (no GPU needed): the reduction waits
    (griddepcontrol.wait) and is built for a programmatic launch, the stream kernel signals, the
    ordinary kernels carry neither; sm_80 gets no PDL variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PDL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "NO-GDC" in proc.stdout:
        pytest.skip("this triton has no grid dependency control (triton.language.extra.cuda.gdc_wait)")
    assert "PDL-OK" in proc.stdout


def test_bit_exact_kernels_compile_without_fma_or_approx_division():
    """Compile the bit-exact kernels for sm_90 on this machine (no GPU needed) and read the
    PTX: no FMA contraction, correctly rounded division, RNE bf16 casts, 16-byte accesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _STATIC_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("GPUTarget" in proc.stderr or "No module named" in proc.stderr):
        pytest.skip("this triton cannot compile for CUDA here: " + proc.stderr[-300:])
    assert proc.returncode == 0 and "STATIC-OK" in proc.stdout, proc.stderr[-2000:]
