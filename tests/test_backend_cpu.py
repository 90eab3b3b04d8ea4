"""The `cpu` backend (C++ kernels of csrc/cpu): bit-exact against reference.py for every
quantize/dequantize op, and matmuls within tolerance of a float64 reference.

Every test forces the cpu backend and checks it really served the call (no silent
fallback to the torch backend).  The best C++ implementation the CPU has serves the bulk of
the tests (AVX-512, AVX2 or generic); every lower one is exercised too: in-process by capping
the ISA (backends.cpu.cap_isa), and through the environment in subprocesses
(NF4KIT_CPU_GENERIC=1, NF4KIT_CPU_ISA=avx2).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nf4kit
from nf4kit import backends, ops
from nf4kit import format as fmt
from nf4kit import reference as R

from conftest import assert_ran

cpu_backend = backends.get("cpu")
pytestmark = pytest.mark.skipif(cpu_backend is None or not cpu_backend.is_available(),
                                reason="nf4kit._C (cpu backend) not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = fmt.BLOCKSIZES


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that NaN == NaN and -0.0 != +0.0 in comparisons."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if not torch.equal(bits(a), bits(b)):
        bad = (bits(a) != bits(b)).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"not bit-identical at {bad}: {a.flatten()[bad].tolist()} vs {b.flatten()[bad].tolist()}")


def rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _force_cpu():
    with nf4kit.use_backend("cpu"):
        yield


# ---------------------------------------------------------------- 4-bit quantize / dequantize
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_4bit_bit_exact(blocksize: int, quant_type: str) -> None:
    # odd sizes: a tail block, an odd element count (padding nibble), vector tails.
    for i, n in enumerate((1, 7, blocksize - 1, 3 * blocksize + 17, 9 * blocksize + 33)):
        for dtype in DTYPES:
            x = rand(n, dtype, seed=1000 * blocksize + 10 * i + DTYPES.index(dtype))
            packed, absmax = ops.quantize_4bit(x, blocksize, quant_type)
            assert_ran("quantize_4bit", "cpu")
            rp, ra = R.quantize_4bit(x, blocksize, quant_type)
            assert_bit_equal(packed, rp)
            assert_bit_equal(absmax, ra)
            for out_dtype in DTYPES:
                out = ops.dequantize_4bit(packed, absmax, None, None, None, blocksize, quant_type, n, out_dtype)
                assert_ran("dequantize_4bit", "cpu")
                assert_bit_equal(out, R.dequantize_4bit(rp, ra, None, None, None, blocksize, quant_type, n,
                                                        out_dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_ties_and_special_values(quant_type: str) -> None:
    # Values exactly on the midpoints (ties go low), just around them, zeros of both signs,
    # an all-zero block, and tiny (subnormal) blocks.
    mids, _ = fmt.quant_thresholds(quant_type)
    near = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
                      torch.nextafter(mids, torch.full_like(mids, -2.0))])
    block = torch.cat([near, torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5])])
    block = torch.nn.functional.pad(block, (0, 64 - block.numel()))
    x = torch.cat([block, torch.zeros(64), -torch.zeros(64), block * 1e-40, block * 3e38, block * 1e-30])
    packed, absmax = ops.quantize_4bit(x, 64, quant_type)
    assert_ran("quantize_4bit", "cpu")
    rp, ra = R.quantize_4bit(x, 64, quant_type)
    assert_bit_equal(packed, rp)
    assert_bit_equal(absmax, ra)
    assert packed[64 // 2: 64].eq(0x77 if quant_type == "nf4" else 0x00).all()  # all-zero block


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_nested_bit_exact(blocksize: int, quant_type: str) -> None:
    # Enough blocks for several nested blocks of 256 plus a tail; the public API double-quantizes.
    n = 300 * blocksize + 45 if blocksize <= 256 else 600 * 64 + 3
    x = rand(n, torch.float32, seed=blocksize, scale=0.02)
    with nf4kit.use_backend("torch"):
        packed, qs = nf4kit.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    args = ops.state_args(qs)
    for dt in DTYPES:
        out = ops.dequantize_4bit(fmt.packed_as_bytes(packed), *args, blocksize, quant_type, n, dt)
        assert_ran("dequantize_4bit", "cpu")
        assert_bit_equal(out, R.dequantize_4bit(fmt.packed_as_bytes(packed), *args, blocksize, quant_type, n, dt))


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_extreme_absmax(out_dtype: torch.dtype) -> None:
    # fp16 subnormals and overflow to inf, bf16 rounding at the extremes: absmax drawn over
    # the whole fp32 range, including 0 and subnormal fp32 values.
    g = torch.Generator().manual_seed(5)
    nb = 4096
    absmax = torch.exp2(torch.empty(nb).uniform_(-149, 127.9, generator=g))
    absmax[:16] = torch.tensor([0.0, 1e-45, 6e-8, 5.9604645e-08, 2.98e-8, 6.1e-5, 65504.0, 65520.0, 65519.99,
                                1e5, 3.4e38, 1.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -14, 3 * 2.0 ** -26])
    packed = torch.randint(0, 256, (nb * 32 // 2,), dtype=torch.uint8, generator=g)
    for qt in ("nf4", "fp4"):
        out = ops.dequantize_4bit(packed, absmax, None, None, None, 32, qt, nb * 32, out_dtype)
        assert_ran("dequantize_4bit", "cpu")
        assert_bit_equal(out, R.dequantize_4bit(packed, absmax, None, None, None, 32, qt, nb * 32, out_dtype))


def test_dequantize_4bit_large_parallel() -> None:
    # A size that spans many OpenMP chunks and an odd tail.
    n = 1_000_003
    x = rand(n, torch.bfloat16, seed=11)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4")
    rp, ra = R.quantize_4bit(x, 64, "nf4")
    assert_bit_equal(packed, rp)
    for dt in DTYPES:
        assert_bit_equal(ops.dequantize_4bit(packed, absmax, None, None, None, 64, "nf4", n, dt),
                         R.dequantize_4bit(rp, ra, None, None, None, 64, "nf4", n, dt))


def test_public_api_roundtrip_served_by_cpu() -> None:
    W = rand(333 * 77, torch.bfloat16, seed=3).view(333, 77)
    for nested in (False, True):
        packed, qs = nf4kit.quantize_4bit(W, blocksize=128, compress_statistics=nested)
        assert_ran("quantize_4bit", "cpu")
        out = nf4kit.dequantize_4bit(packed, qs)
        assert_ran("dequantize_4bit", "cpu")
        with nf4kit.use_backend("torch"):
            rp, rqs = nf4kit.quantize_4bit(W, blocksize=128, compress_statistics=nested)
            ref = nf4kit.dequantize_4bit(rp, rqs)
        assert torch.equal(packed, rp)
        assert_bit_equal(out, ref)


# ---------------------------------------------------------------- 8-bit dynamic map
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_blockwise_8bit_bit_exact(blocksize: int) -> None:
    code = fmt.dynamic_map()
    for i, n in enumerate((5, blocksize + 3, 4 * blocksize + 13)):
        for dtype in DTYPES:
            x = rand(n, dtype, seed=7 * blocksize + i)
            x[: min(3, n)] = 0  # exact zeros
            q, absmax = ops.quantize_blockwise(x, code, blocksize)
            assert_ran("quantize_blockwise", "cpu")
            rq, ra = R.quantize_blockwise(x, code, blocksize)
            assert_bit_equal(q, rq)
            assert_bit_equal(absmax, ra)
            for out_dtype in DTYPES:
                out = ops.dequantize_blockwise(q, absmax, code, blocksize, out_dtype)
                assert_ran("dequantize_blockwise", "cpu")
                assert_bit_equal(out, R.dequantize_blockwise(rq, ra, code, blocksize, out_dtype))


def test_blockwise_8bit_midpoint_ties() -> None:
    code = fmt.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([mids, torch.nextafter(mids, torch.ones_like(mids)), torch.nextafter(mids, -torch.ones_like(mids)),
                   torch.tensor([1.0, -1.0, 0.0])])
    q, absmax = ops.quantize_blockwise(x, code, 4096)
    assert_ran("quantize_blockwise", "cpu")
    rq, ra = R.quantize_blockwise(x, code, 4096)
    assert_bit_equal(q, rq)
    assert_bit_equal(absmax, ra)


# ---------------------------------------------------------------- int8 absmax
@pytest.mark.parametrize("blocksize", [0, 1, 3, 32, 100, 4096, 100_000])
def test_absmax_int8_bit_exact(blocksize: int) -> None:
    for i, n in enumerate((1, 9, 1000, 70_001)):
        for dtype in DTYPES:
            x = rand(n, dtype, seed=31 * i + blocksize, scale=[1.0, 1e-3, 300.0][i % 3])
            q, absmax = ops.quantize_absmax_int8(x, blocksize)
            assert_ran("quantize_absmax_int8", "cpu")
            rq, ra = R.quantize_absmax_int8(x, blocksize)
            assert_bit_equal(q, rq)
            assert_bit_equal(absmax, ra)
            for out_dtype in DTYPES:
                out = ops.dequantize_absmax_int8(q, absmax, blocksize, out_dtype)
                assert_ran("dequantize_absmax_int8", "cpu")
                assert_bit_equal(out, R.dequantize_absmax_int8(rq, ra, blocksize, out_dtype))


def test_absmax_int8_half_ties_zero_and_tiny() -> None:
    # x * c landing on .5 (round half to even), all-zero blocks, tiny blocks (the 1e-30 clamp).
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -126.5] + [0.0] * 8 + [1e-35, -2e-35] * 4)
    for bs in (0, 8):
        q, absmax = ops.quantize_absmax_int8(x, bs)
        assert_ran("quantize_absmax_int8", "cpu")
        rq, ra = R.quantize_absmax_int8(x, bs)
        assert_bit_equal(q, rq)
        assert_bit_equal(absmax, ra)
    q, scale = nf4kit.quantize_absmax_int8(x.view(3, 8), blocksize=None)
    assert_ran("quantize_absmax_int8", "cpu")
    assert q.shape == (3, 8) and scale.dim() == 0
    assert_bit_equal(nf4kit.dequantize_absmax_int8(q, scale), R.dequantize_absmax_int8(
        q.view(-1), scale.view(1), 0, torch.float32).view(3, 8))


# ---------------------------------------------------------------- matmuls
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


MATMUL_CASES = [
    # (N, K, blocksize): odd N and K, K not a multiple of the blocksize, blocks crossing rows.
    (96, 48, 64),
    (37, 53, 32),
    (19, 4100, 64),
    (33, 257, 4096),
    (130, 64, 128),
]


@pytest.mark.parametrize("N,K,blocksize", MATMUL_CASES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matmul_4bit_forward_backward(N: int, K: int, blocksize: int, nested: bool, quant_type: str) -> None:
    g = torch.Generator().manual_seed(N * K + blocksize)
    W = torch.randn(N, K, generator=g)
    with nf4kit.use_backend("torch"):
        packed, qs = nf4kit.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    r = 3
    A, B, bias = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    st = ops.state_args(qs)
    pb = fmt.packed_as_bytes(packed)
    # M: the fused small-M kernels, both sides of every dtype's crossover, the tiled path.
    Ms = sorted({1, 2, 5, 40} | {m + d for m in (*cpu_backend.GEMV_MAX_M.values(), *cpu_backend.GEMV_T_MAX_M.values())
                                 for d in (0, 1)})
    for M in Ms:
        for dtype in DTYPES:
            x = torch.randn(M, K, generator=g).to(dtype)
            dy = torch.randn(M, N, generator=g).to(dtype)
            for with_extra in (False, True):
                b = bias.to(dtype) if with_extra else None
                la, lb = (A.to(dtype), B.to(dtype)) if with_extra else (None, None)
                y = ops.matmul_4bit(x, pb, *st, blocksize, quant_type, N, K, b, la, lb, 0.5)
                assert_ran("matmul_4bit", "cpu")
                assert y.dtype == dtype and y.shape == (M, N)
                ref = x.double() @ Wd.t()
                if with_extra:
                    ref = ref + bias.to(dtype).double() + 0.5 * (x.double() @ A.to(dtype).double().t()) @ B.to(
                        dtype).double().t()
                assert rel_err(y, ref) < tol(dtype), (M, dtype, with_extra, rel_err(y, ref))

                dx = ops.matmul_4bit_backward_input(dy, pb, *st, blocksize, quant_type, N, K, la, lb, 0.5)
                assert_ran("matmul_4bit_backward_input", "cpu")
                assert dx.dtype == dtype and dx.shape == (M, K)
                refdx = dy.double() @ Wd
                if with_extra:
                    refdx = refdx + 0.5 * (dy.double() @ B.to(dtype).double()) @ A.to(dtype).double()
                assert rel_err(dx, refdx) < tol(dtype), (M, dtype, with_extra, rel_err(dx, refdx))


def test_matmul_4bit_public_autograd_served_by_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    N, K = 70, 96
    W = torch.randn(N, K, generator=g)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64)
    Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    A = torch.randn(4, K, generator=g, requires_grad=True)
    B = torch.randn(N, 4, generator=g, requires_grad=True)
    y = nf4kit.matmul_4bit(x, packed, qs, lora_A=A, lora_B=B, lora_scale=2.0)
    assert_ran("matmul_4bit", "cpu")
    y.square().sum().backward()
    assert_ran("matmul_4bit_backward_input", "cpu")
    xd = x.detach().double().requires_grad_()
    yd = xd @ Wd.t() + 2.0 * (xd @ A.detach().double().t()) @ B.detach().double().t()
    yd.square().sum().backward()
    assert rel_err(y.detach(), yd.detach()) < 1e-5
    assert rel_err(x.grad, xd.grad) < 1e-5


def test_matmul_4bit_tiles_cover_every_row_and_column(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny tiles: many row bands (forward) and column bands (backward), ragged last band.
    monkeypatch.setattr(cpu_backend, "TILE_ELEMS", 700)
    g = torch.Generator().manual_seed(1)
    N, K = 45, 83
    W = torch.randn(N, K, generator=g)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=32, compress_statistics=True)
    Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    x = torch.randn(40, K, generator=g)
    dy = torch.randn(40, N, generator=g)
    st = ops.state_args(qs)
    y = ops.matmul_4bit(x, fmt.packed_as_bytes(packed), *st, 32, "nf4", N, K, None, None, None, 1.0)
    assert_ran("matmul_4bit", "cpu")
    assert rel_err(y, x.double() @ Wd.t()) < 1e-5
    dx = ops.matmul_4bit_backward_input(dy, fmt.packed_as_bytes(packed), *st, 32, "nf4", N, K, None, None, 1.0)
    assert_ran("matmul_4bit_backward_input", "cpu")
    assert rel_err(dx, dy.double() @ Wd) < 1e-5


def test_matmul_empty_batch() -> None:
    W = torch.randn(8, 64)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64)
    y = ops.matmul_4bit(torch.empty(0, 64), fmt.packed_as_bytes(packed), *ops.state_args(qs), 64, "nf4", 8, 64,
                        None, None, None, 1.0)
    assert y.shape == (0, 8)


# ---------------------------------------------------------------- the portable C++ path
_GENERIC_SCRIPT = r"""
import torch, nf4kit
from nf4kit import ops, backends, reference as R, format as fmt
from nf4kit.backends import cpu
assert cpu.isa() == "generic", cpu.isa()
def eq(a, b):
    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
torch.manual_seed(0)
with nf4kit.use_backend("cpu"):
    for n, bs in ((1001, 64), (77, 32), (5000, 4096)):
        x = torch.randn(n)
        for qt in ("nf4", "fp4"):
            p, a = ops.quantize_4bit(x, bs, qt); rp, ra = R.quantize_4bit(x, bs, qt)
            eq(p, rp); eq(a, ra)
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                eq(ops.dequantize_4bit(p, a, None, None, None, bs, qt, n, dt),
                   R.dequantize_4bit(p, a, None, None, None, bs, qt, n, dt))
        q, a = ops.quantize_absmax_int8(x, 0); rq, ra = R.quantize_absmax_int8(x, 0); eq(q, rq); eq(a, ra)
        eq(ops.dequantize_absmax_int8(q, a, 0, torch.bfloat16), R.dequantize_absmax_int8(q, a, 0, torch.bfloat16))
        assert backends.last_backend["dequantize_absmax_int8"] == "cpu"
    W = torch.randn(37, 53)
    p, qs = nf4kit.quantize_4bit(W, blocksize=32)
    Wd = nf4kit.dequantize_4bit(p, qs, dtype=torch.float32).double()
    x = torch.randn(3, 53)
    y = ops.matmul_4bit(x, fmt.packed_as_bytes(p), *ops.state_args(qs), 32, "nf4", 37, 53, None, None, None, 1.0)
    assert backends.last_backend["matmul_4bit"] == "cpu"
    ref = x.double() @ Wd.t()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
print("ok")
"""


def test_generic_cpu_path_subprocess() -> None:
    env = dict(os.environ, NF4KIT_CPU_GENERIC="1", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


# ---------------------------------------------------------------- every ISA path, one process
def _available_isas() -> list[str]:
    if cpu_backend is None or not cpu_backend.is_available():
        return []
    have = [i for i in ("avx512", "avx2", "generic") if cpu_backend.cap_isa(i) == i]
    cpu_backend.cap_isa("avx512")
    return have


ISAS = _available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Caps the C++ implementation at one ISA for the test, restores the best one after."""
    assert cpu_backend.cap_isa(request.param) == request.param
    yield request.param
    cpu_backend.cap_isa("avx512")


def test_isa_paths_available() -> None:
    # On x86-64 build machines at least AVX2 and the generic path exist; the best one is the default.
    import nf4kit.backends._native as native
    assert ISAS[-1] == "generic" and cpu_backend.isa() == ISAS[0] == native.load().cpu.isa()


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_isa_dequantize_4bit_bit_exact(isa: str, blocksize: int) -> None:
    # Plain and nested state, every output dtype, a tail of 16+ and of < 16 elements, odd count.
    for n, nested in ((7 * blocksize + 16 + 5, False), (300 * 64 + 49, True), (33, False)):
        x = rand(n, torch.float32, seed=n + blocksize, scale=3.0)
        for qt in ("nf4", "fp4"):
            with nf4kit.use_backend("torch"):
                packed, qs = nf4kit.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=qt)
            pb, st = fmt.packed_as_bytes(packed), ops.state_args(qs)
            for dt in DTYPES:
                out = ops.dequantize_4bit(pb, *st, blocksize, qt, n, dt)
                assert_ran("dequantize_4bit", "cpu")
                assert_bit_equal(out, R.dequantize_4bit(pb, *st, blocksize, qt, n, dt))


def test_isa_dequantize_4bit_extreme_absmax(isa: str) -> None:
    # fp32 subnormal products (the bf16 rounding must not flush them), fp16 subnormals and
    # overflow, huge values, zero absmax.  (No inf/NaN absmax: the format cannot produce one,
    # and reference.py's bf16 NaN bits differ from the core's on every path.)
    g = torch.Generator().manual_seed(7)
    nb = 1024
    absmax = torch.exp2(torch.empty(nb).uniform_(-149, 127.9, generator=g))
    absmax[:12] = torch.tensor([0.0, 1e-45, 1e-40, 1.1754942e-38, 5.9604645e-08, 65520.0, 3.4e38, 3.3e38,
                                1.5e-38, 2.0 ** -126, 2.0 ** -133, 1.0])
    packed = torch.randint(0, 256, (nb * 32 // 2,), dtype=torch.uint8, generator=g)
    for qt in ("nf4", "fp4"):
        for dt in DTYPES:
            out = ops.dequantize_4bit(packed, absmax, None, None, None, 32, qt, nb * 32, dt)
            assert_bit_equal(out, R.dequantize_4bit(packed, absmax, None, None, None, 32, qt, nb * 32, dt))


def test_isa_dequantize_4bit_tile_bit_exact(isa: str) -> None:
    # Tiles at odd columns / widths (odd element starts inside a byte), rows crossing blocks.
    from nf4kit.backends import _native
    C = _native.load()
    N, K, bs = 13, 197, 64
    W = rand(N * K, torch.float32, seed=3)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=bs, compress_statistics=True)
    pb, st = fmt.packed_as_bytes(packed), ops.state_args(qs)
    keep, (a, aq, na, nc, off) = cpu_backend._state(*st)
    for dt in DTYPES:
        full = R.dequantize_4bit(pb, *st, bs, "nf4", N * K, dt).view(N, K)
        for (n0, n1, k0, k1) in ((0, N, 0, K), (1, 12, 3, 196), (5, 6, 33, 130), (2, 9, 64, 65)):
            out = torch.empty((n1 - n0) * (k1 - k0), dtype=dt)
            _native.check(C.cpu.dequantize_4bit_tile(_native.ptr(pb), a, aq, na, nc, off, bs, 0, N, K, n0, n1, k0, k1,
                                                     _native.ptr(out), _native.DTYPE_CODES[dt]), "tile")
            assert_bit_equal(out.view(n1 - n0, k1 - k0), full[n0:n1, k0:k1].contiguous())
    del keep


# (N, K, blocksize): the AVX-512 GEMV paths -- K % 128 == 0 with blocksize >= 64 (blocks of
# 64 and blocks crossing rows), K % 32 == 0 (blocks crossing rows, blocksize 32, K < blocksize)
# -- and the fallback (K % 32 != 0).
ISA_MATMUL_CASES = [(19, 640, 64), (11, 384, 256), (67, 96, 64), (40, 2080, 32), (9, 1056, 4096), (23, 100, 64)]


@pytest.mark.parametrize("N,K,blocksize", ISA_MATMUL_CASES)
def test_isa_fused_matmul_4bit(isa: str, N: int, K: int, blocksize: int) -> None:
    g = torch.Generator().manual_seed(N + K)
    W = torch.randn(N, K, generator=g)
    with nf4kit.use_backend("torch"):
        packed, qs = nf4kit.quantize_4bit(W, blocksize=blocksize, compress_statistics=True, quant_type="fp4")
        Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    pb, st = fmt.packed_as_bytes(packed), ops.state_args(qs)
    bias = torch.randn(N, generator=g)
    A, B = torch.randn(2, K, generator=g), torch.randn(N, 2, generator=g)
    for M in (1, 3, 4, 9):  # M tiles of 4 and every remainder
        x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
        y = ops.matmul_4bit(x, pb, *st, blocksize, "fp4", N, K, bias, A, B, 0.5)
        assert_ran("matmul_4bit", "cpu")
        ref = x.double() @ Wd.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
        assert rel_err(y, ref) < 1e-5, (M, rel_err(y, ref))
        dx = ops.matmul_4bit_backward_input(dy, pb, *st, blocksize, "fp4", N, K, None, None, 1.0)
        assert_ran("matmul_4bit_backward_input", "cpu")
        assert rel_err(dx, dy.double() @ Wd) < 1e-5, (M, rel_err(dx, dy.double() @ Wd))


def test_dequantize_4bit_streaming_output_bit_exact() -> None:
    # Outputs >= 16 MiB take the AVX-512 non-temporal store path: bit-exact there too, with an
    # odd tail; fp32 and bf16.
    g = torch.Generator().manual_seed(9)
    nmax = (8 << 20) + 37
    packed = torch.randint(0, 256, ((nmax + 1) // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(fmt.num_blocks(nmax, 64), generator=g) * 4
    for dt, n in ((torch.bfloat16, nmax), (torch.float32, (4 << 20) + 37)):
        out = ops.dequantize_4bit(packed, absmax, None, None, None, 64, "nf4", n, dt)
        assert_ran("dequantize_4bit", "cpu")
        assert_bit_equal(out, R.dequantize_4bit(packed, absmax, None, None, None, 64, "nf4", n, dt))


_ISA_ENV_SCRIPT = r"""
import torch, nf4kit
from nf4kit import ops, reference as R
from nf4kit.backends import cpu
assert cpu.isa() == "avx2", cpu.isa()
assert cpu.cap_isa("avx512") == "avx2"  # the environment cap holds
x = torch.randn(4099)
with nf4kit.use_backend("cpu"):
    p, a = ops.quantize_4bit(x, 64, "nf4")
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(ops.dequantize_4bit(p, a, None, None, None, 64, "nf4", 4099, dt).view(torch.uint8),
                           R.dequantize_4bit(p, a, None, None, None, 64, "nf4", 4099, dt).view(torch.uint8))
print("ok")
"""


@pytest.mark.skipif("avx2" not in ISAS, reason="no AVX2 on this CPU")
def test_isa_env_cap_subprocess() -> None:
    env = dict(os.environ, NF4KIT_CPU_ISA="avx2", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _ISA_ENV_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
