"""The hand-written CUDA kernels (backend `cuda`) against reference.py.

Skipped without a CUDA device (and without a CUDA build of nf4kit._C).  On a GPU:
quantize / dequantize bit-exact for every blocksize, quant type, dtype, odd sizes and tails,
nested (double-quant) state; GEMV, fused GEMM forward and backward by relative error
against a float64 reference; the routing paths; CUDA-graph capture of dequantize.
"""
from __future__ import annotations

import pytest
import torch

import nf4kit
from nf4kit import backends, ops
from nf4kit import format as fmt
from nf4kit import reference as ref

cuda_backend = backends.get("cuda")
HAS_CUDA_BACKEND = cuda_backend is not None and cuda_backend.is_available()
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_BACKEND,
    reason="needs a CUDA device and nf4kit._C built with CUDA (the cuda backend only runs on a GPU)",
)

DEV = "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 2, 31, 33, 1001, 4097, 65537)  # odd counts, partial chunks, tails


def _ran_cuda(op: str) -> None:
    assert backends.last_backend.get(op) == "cuda", f"{op} ran on {backends.last_backend.get(op)}, not cuda"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(DEV)


def _state(n: int, blocksize: int, quant_type: str, nested: bool, seed: int):
    """(packed, absmax, nested_absmax, nested_code, offset) made by the reference."""
    A = _rand((n,), torch.float32, seed) * (1 + torch.rand(n, generator=_gen(seed + 1)).to(DEV) * 10)
    packed, absmax = ref.quantize_4bit(A, blocksize, quant_type)
    if not nested:
        return packed, absmax, None, None, None
    q, nested_absmax, offset = ref.double_quantize(absmax)
    return packed, q, nested_absmax, fmt.dynamic_map().to(DEV), offset


# ---------------------------------------------------------------- quantize / dequantize, bit-exact
@pytest.mark.parametrize("blocksize", fmt.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_bit_exact(blocksize, quant_type):
    for i, n in enumerate(SIZES):
        for dt in FLOATS:
            A = _rand((n,), dt, 10 * i + blocksize, scale=3.0)
            A[: min(n, blocksize)] = 0  # an all-zero block (or part of one)
            with nf4kit.use_backend("cuda"):
                packed, absmax = ops.quantize_4bit(A, blocksize, quant_type)
            _ran_cuda("quantize_4bit")
            rp, ra = ref.quantize_4bit(A, blocksize, quant_type)
            assert torch.equal(packed, rp), (n, dt)
            assert torch.equal(absmax, ra), (n, dt)


@pytest.mark.parametrize("blocksize", fmt.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_bit_exact(blocksize, quant_type, nested):
    for i, n in enumerate(SIZES):
        st = _state(n, blocksize, quant_type, nested, seed=i)
        for dt in FLOATS:
            with nf4kit.use_backend("cuda"):
                out = ops.dequantize_4bit(*st, blocksize, quant_type, n, dt)
            _ran_cuda("dequantize_4bit")
            assert torch.equal(out, ref.dequantize_4bit(*st, blocksize, quant_type, n, dt)), (n, dt)


def test_dequantize_4bit_unaligned_view():
    """A packed view that is not 16-byte aligned takes the element-wise path: same bits."""
    n, bs = 4096 + 77, 64
    packed, absmax, *_ = _state(n, bs, "nf4", False, seed=3)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=DEV)
    buf[1:] = packed
    view = buf[1:]
    assert view.data_ptr() % 16 != 0
    with nf4kit.use_backend("cuda"):
        out = ops.dequantize_4bit(view, absmax, None, None, None, bs, "nf4", n, torch.bfloat16)
    _ran_cuda("dequantize_4bit")
    assert torch.equal(out, ref.dequantize_4bit(packed, absmax, None, None, None, bs, "nf4", n, torch.bfloat16))


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_blockwise_8bit_bit_exact(blocksize):
    code = fmt.dynamic_map().to(DEV)
    for i, n in enumerate((1, 255, 257, 5000, 70001)):
        for dt in FLOATS:
            A = _rand((n,), dt, 100 + i)
            with nf4kit.use_backend("cuda"):
                q, absmax = ops.quantize_blockwise(A, code, blocksize)
            _ran_cuda("quantize_blockwise")
            rq, ra = ref.quantize_blockwise(A, code, blocksize)
            assert torch.equal(q, rq) and torch.equal(absmax, ra), (n, dt)
            for odt in FLOATS:
                with nf4kit.use_backend("cuda"):
                    out = ops.dequantize_blockwise(rq, ra, code, blocksize, odt)
                _ran_cuda("dequantize_blockwise")
                assert torch.equal(out, ref.dequantize_blockwise(rq, ra, code, blocksize, odt)), (n, dt, odt)


def test_public_api_double_quant_matches_reference():
    """nf4kit.quantize_4bit(compress_statistics=True) on cuda == the reference's state, bit for bit."""
    A = _rand((333, 129), torch.bfloat16, 7)
    with nf4kit.use_backend("cuda"):
        packed, qs = nf4kit.quantize_4bit(A, blocksize=64, compress_statistics=True)
        W = nf4kit.dequantize_4bit(packed, qs)
    _ran_cuda("dequantize_4bit")
    rp, ra = ref.quantize_4bit(A, 64, "nf4")
    rq, rn, roff = ref.double_quantize(ra)
    assert torch.equal(packed.view(-1), rp)
    assert torch.equal(qs.absmax, rq) and torch.equal(qs.state2.absmax, rn) and torch.equal(qs.offset, roff)
    exp = ref.dequantize_4bit(rp, rq, rn, fmt.dynamic_map().to(DEV), roff, 64, "nf4", A.numel(), torch.bfloat16)
    assert torch.equal(W.view(-1), exp)


# ---------------------------------------------------------------- matmuls, relative error vs float64
def _tol(dt):
    return 1e-5 if dt == torch.float32 else 1e-2


def _relerr(out, exp):
    return ((out.double() - exp).norm() / exp.norm()).item()


def _weight(N, K, blocksize, quant_type, nested, seed):
    st = _state(N * K, blocksize, quant_type, nested, seed)
    W64 = ref.dequantize_4bit(*st, blocksize, quant_type, N * K, torch.float64).view(N, K)
    return st, W64


MM_CASES = [  # (M, N, K, blocksize, nested)
    (1, 300, 256, 64, False),
    (3, 77, 4096, 128, True),
    (8, 1000, 96, 32, False),
    (16, 129, 320, 64, True),
    (100, 256, 512, 4096, False),  # blocks cross rows
    (257, 72, 64, 256, True),  # blocksize > K
    (5, 40, 100, 64, False),  # K % 32 != 0: dequantize + cuBLAS path
    (2, 517, 3104, 32, True),  # GEMV: 3 K-splits of 33/33/31 chunks, rows not a multiple of 4
    (16, 200, 2048, 64, True),  # fused GEMM split-K (8 splits), bias + LoRA in the finalize
    (40, 130, 1024, 256, False),  # fused GEMM split-K (4 splits), partial M and N tiles
]
# The two fused-GEMM split-K cases above: the tensor-core GEMVs (M <= 16) and the table GEMM
# (M = 17..64, sm_90/100) would take them by default, so the forward test keeps those off for them.
FUSED_GEMM_CASES = {(16, 200, 2048, 64, True), (40, 130, 1024, 256, False)}


@pytest.mark.parametrize("M,N,K,blocksize,nested", MM_CASES)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("lora", [False, True])
def test_matmul_forward(M, N, K, blocksize, nested, dt, lora, monkeypatch):
    monkeypatch.setattr(cuda_backend, "FUSED_MAX_M", 1024)  # M = 100, 257: the fused kernel's M tiles too
    if (M, N, K, blocksize, nested) in FUSED_GEMM_CASES:
        monkeypatch.setattr(cuda_backend, "GEMV_MMA", False)
        monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", False)
        assert cuda_backend._gemv_kernel(M, N, K, dt, blocksize) == "none"  # matmul_4bit's fused GEMM
    st, W64 = _weight(N, K, blocksize, "nf4", nested, seed=M + N)
    x = _rand((M, K), dt, 1)
    bias = _rand((N,), torch.float32, 2)
    r = 12
    A = _rand((r, K), dt, 3, 0.1) if lora else None
    B = _rand((N, r), dt, 4, 0.1) if lora else None
    with nf4kit.use_backend("cuda"):
        y = ops.matmul_4bit(x, st[0], *st[1:], blocksize, "nf4", N, K, bias, A, B, 0.7)
    _ran_cuda("matmul_4bit")
    assert y.dtype == dt and y.shape == (M, N)
    exp = x.double() @ W64.t() + bias.double()
    if lora:
        exp = exp + 0.7 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(y, exp) < _tol(dt)


@pytest.mark.parametrize("M,N,K,blocksize,nested", MM_CASES)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("lora", [False, True])
def test_matmul_backward_input(M, N, K, blocksize, nested, dt, lora, monkeypatch):
    monkeypatch.setattr(cuda_backend, "FUSED_MAX_M", 1024)
    st, W64 = _weight(N, K, blocksize, "fp4", nested, seed=M * N)
    dy = _rand((M, N), dt, 5)
    r = 70  # > one 64-wide LoRA tile
    A = _rand((r, K), dt, 6, 0.1) if lora else None
    B = _rand((N, r), dt, 7, 0.1) if lora else None
    with nf4kit.use_backend("cuda"):
        dx = ops.matmul_4bit_backward_input(dy, st[0], *st[1:], blocksize, "fp4", N, K, A, B, 1.5)
    _ran_cuda("matmul_4bit_backward_input")
    assert dx.dtype == dt and dx.shape == (M, K)
    exp = dy.double() @ W64
    if lora:
        exp = exp + 1.5 * (dy.double() @ B.double()) @ A.double()
    assert _relerr(dx, exp) < _tol(dt)


@pytest.mark.parametrize("rows,depth", [(1, 2), (2, 2), (8, 2), (1, 4), (1, 8), (2, 3), (2, 4), (4, 3), (4, 4)])
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_rows_and_depth_variants(monkeypatch, rows, depth, M):
    """The decode GEMV's other row groupings and load-ring depths (the sweep's variants) agree
    with the reference, on several splits so that split ends fall inside a lane's ring."""
    N, K = 77, 4096 + 64
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", False)  # (K % 256 != 0 keeps it off anyway)
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", rows)
    monkeypatch.setattr(cuda_backend, "GEMV_DEPTH", depth)
    st, W64 = _weight(N, K, 64, "nf4", True, seed=rows * 10 + depth + M)
    x = _rand((M, K), torch.bfloat16, 31 + depth)
    for splits in (1, 3):
        monkeypatch.setattr(cuda_backend, "GEMV_SPLITS", splits)
        with nf4kit.use_backend("cuda"):
            y = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0)
        _ran_cuda("matmul_4bit")
        assert _relerr(y, x.double() @ W64.t()) < 1e-2, f"splits={splits}"


@pytest.mark.parametrize("depth", [4, 8])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,quant_type,nested", [(77, 3072, "nf4", True), (5, 2048, "fp4", False),
                                                   (1000, 4096, "nf4", True), (3001, 1024, "nf4", False)])
def test_gemv_stream_variants(monkeypatch, depth, dt, N, K, quant_type, nested):
    """The memory-order stream GEMV (M = 1, K % 1024 == 0): odd row counts, fewer tiles than warps
    (5 x 2), and more tiles than resident warps (several passes, rings crossing the last row), with
    bias and LoRA in the finalize kernel."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", False)
    monkeypatch.setattr(cuda_backend, "GEMV_STREAM", True)
    monkeypatch.setattr(cuda_backend, "GEMV_STREAM_DEPTH", depth)
    assert cuda_backend._gemv_variant(1, N, K, dt, 64, K // 1024) == (depth, cuda_backend._GEMV_STREAM)
    assert cuda_backend._gemv_split_count(1, N, K, dt, 64, torch.device("cuda")) == K // 1024
    st, W64 = _weight(N, K, 64, quant_type, nested, seed=N + depth)
    x = _rand((1, K), dt, 71 + depth)
    bias = _rand((N,), torch.float32, 72)
    A, B = _rand((8, K), dt, 73, 0.1), _rand((N, 8), dt, 74, 0.1)
    with nf4kit.use_backend("cuda"):
        y = ops.matmul_4bit(x, st[0], *st[1:], 64, quant_type, N, K, bias, A, B, 0.5)
    _ran_cuda("matmul_4bit")
    exp = x.double() @ W64.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert y.shape == (1, N) and y.dtype == dt
    assert _relerr(y, exp) < (1e-2 if dt != torch.float32 else 1e-5)


def test_gemv_stream_leaves_other_shapes_to_the_row_kernel(monkeypatch):
    """With the stream kernel on (the tensor-core one off), M > 1 and K not a multiple of 1024 still
    take the row kernel."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", False)
    monkeypatch.setattr(cuda_backend, "GEMV_STREAM", True)
    for M, K in ((1, 1024 + 64), (3, 2048)):
        N = 45
        st, W64 = _weight(N, K, 64, "nf4", True, seed=M + K)
        x = _rand((M, K), torch.bfloat16, 81)
        assert cuda_backend._gemv_variant(M, N, K, x.dtype, 64, 1)[1] & cuda_backend._GEMV_STREAM == 0
        with nf4kit.use_backend("cuda"):
            y = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0)
        _ran_cuda("matmul_4bit")
        assert _relerr(y, x.double() @ W64.t()) < 1e-2


def _row_errors_within(y, x, W64, exp, bound):
    """Each row's error against its own scale: |y_n - exp_n| <= bound * (sum_k |x_k W_nk| + |exp_n|),
    so one missing, duplicated or misscaled row fails even among thousands."""
    scale = x.double().abs() @ W64.abs().t() + exp.abs()
    return bool(((y.double() - exp).abs() <= bound * scale).all())


def _check_half_matmul_rows(M, N, K, bs, quant_type, nested, dt, seed):
    """matmul_4bit on the cuda backend, x [M, K] in dt: with bias and LoRA against float64 (relative
    error), and without, every output within the bf16/fp16 rounding of the code table (the tensor-core
    kernels' table rounds the codes to x's precision)."""
    st, W64 = _weight(N, K, bs, quant_type, nested, seed=N + K)
    x = _rand((M, K), dt, seed + M)
    bias = _rand((N,), torch.float32, seed + 1)
    A, B = _rand((8, K), dt, seed + 2, 0.1), _rand((N, 8), dt, seed + 3, 0.1)
    with nf4kit.use_backend("cuda"):
        y = ops.matmul_4bit(x, st[0], *st[1:], bs, quant_type, N, K, bias, A, B, 0.5)
        y0 = ops.matmul_4bit(x, st[0], *st[1:], bs, quant_type, N, K, None, None, None, 1.0)
    _ran_cuda("matmul_4bit")
    exp0 = x.double() @ W64.t()
    exp = exp0 + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert y.shape == (M, N) and y.dtype == dt
    assert _relerr(y, exp) < 1e-2
    bound = 2.0 ** -7 if dt == torch.bfloat16 else 2.0 ** -9
    assert _row_errors_within(y0, x, W64, exp0, bound)


@pytest.mark.parametrize("M,depth", [(1, 2), (1, 3), (3, 2), (8, 3), (9, 2), (16, 3)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,bs,quant_type,nested", [
    (77, 3072, 64, "nf4", True),     # odd N: the last row block runs past N; 12 tiles a row
    (5, 256, 64, "fp4", False),      # one tile a row, fewer rows than a row block
    (1000, 4096, 128, "nf4", True),  # blocksize 128: a lane's two quarters share one block
    (3001, 1280, 256, "nf4", False),  # blocksize 256, several passes of the persistent grid
    (16, 512, 4096, "fp4", True),    # blocks span rows (blocksize > K)
    (4099, 2048, 64, "nf4", True)])  # more tiles than resident warps, a row past the last block
def test_gemv_mma(monkeypatch, M, depth, dt, N, K, bs, quant_type, nested):
    """The tensor-core GEMVs (GEMV_MMA; M = 1 and the batch kernel with one n-tile for M <= 8, two
    for M <= 16), both load rings: every output against the float64 reference within the bf16/fp16
    rounding of the code table, with bias and LoRA in the finalize kernel."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_DEPTH", depth)
    assert cuda_backend._gemv_kernel(M, N, K, dt, bs) == "mma"
    depth_used, options = cuda_backend._gemv_variant(M, N, K, dt, bs, K // 256)
    kernels = cuda_backend._GEMV_MMA | cuda_backend._GEMV_MMA_GEMM | cuda_backend._GEMV_STREAM
    assert depth_used == depth and options & kernels == cuda_backend._GEMV_MMA
    assert cuda_backend._gemv_split_count(M, N, K, dt, bs, torch.device("cuda")) == K // 256
    _check_half_matmul_rows(M, N, K, bs, quant_type, nested, dt, seed=91)


# The table GEMM's weights (both forms): N, K, blocksize, quant type, double quant.
_TABLE_GEMM_WEIGHTS = [
    (77, 3072, 64, "nf4", True),      # odd N, one block (128 rows), part-empty warps
    (1000, 4096, 128, "nf4", True),   # blocksize 128: two quarters share a block
    (3001, 1280, 256, "fp4", False),  # 24 blocks, 5 tiles
    (16, 512, 4096, "fp4", True),     # blocks span rows (blocksize > K)
    (4099, 7168, 64, "nf4", True)]    # 33 blocks, 28 tiles in the heuristic's 4 splits (H100)


@pytest.mark.parametrize("M,splits", [(17, None), (32, 1), (33, None), (64, 3), (64, None)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,bs,quant_type,nested", _TABLE_GEMM_WEIGHTS)
def test_mma_gemm(monkeypatch, M, splits, dt, N, K, bs, quant_type, nested):
    """The 8-warp table GEMM (GEMV_MMA_GEMM, M = 17..64; the default at M = 33..64 on sm_90/100): every
    output against the float64 reference within the bf16/fp16 rounding of the code table, one split
    (bias and LoRA in the kernel) and several (in the finalize).  The compact form (the default at
    M <= 32 on sm_90) is checked against it below."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM_COMPACT", False)
    monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", splits)
    dev = torch.device(DEV)
    assert cuda_backend._gemv_kernel(M, N, K, dt, bs, dev) == "mma-gemm"
    S = cuda_backend._gemv_split_count(M, N, K, dt, bs, dev)
    assert 1 <= S <= K // 256 and (splits is None or S <= splits)
    _check_half_matmul_rows(M, N, K, bs, quant_type, nested, dt, seed=121)


@pytest.mark.parametrize("M,splits", [(17, None), (32, 3), (33, 1), (64, None)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,bs,quant_type,nested", _TABLE_GEMM_WEIGHTS)
def test_mma_gemm_compact_gives_the_table_gemms_bits(monkeypatch, M, splits, dt, N, K, bs, quant_type, nested):
    """The compact table GEMM (GEMV_MMA_GEMM_COMPACT, the default at M <= 32 on sm_90: the table at
    the window's dynamic base, x buffer 0 in the table's unused bytes; M <= 32 two 8-warp blocks per
    SM, M > 32 one block of 16 warps, two per 16 W rows) computes the same mma in the same order as the
    8-warp layout: at the same splits its output equals that kernel's bit for bit, bias and LoRA
    included, and agrees with the float64 reference; its option bit reaches the C call."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", True)
    monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", splits)
    dev = torch.device(DEV)
    st, W64 = _weight(N, K, bs, quant_type, nested, seed=N + K + 5)
    x = _rand((M, K), dt, 131 + M)
    bias = _rand((N,), torch.float32, 132)
    A, B = _rand((8, K), dt, 133, 0.1), _rand((N, 8), dt, 134, 0.1)
    seen = _OptionsSeen(cuda_backend._C())
    monkeypatch.setattr(cuda_backend, "_C", lambda: seen)
    if not cuda_backend._mma_fits(torch.cuda.current_device(), cuda_backend._MMA_GEMM_SMEM_BYTES):
        pytest.skip("this GPU does not grant the 8-warp table GEMM its shared memory to compare against")
    S = None
    out = {}
    for compact in (True, False):  # compact first: its splits (the heuristic's differ) are pinned for both
        monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM_COMPACT", compact)
        assert cuda_backend._gemv_kernel(M, N, K, dt, bs, dev) == "mma-gemm"
        S = S or cuda_backend._gemv_split_count(M, N, K, dt, bs, dev)
        monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", S)
        seen.options.clear()
        with nf4kit.use_backend("cuda"):
            out[compact] = ops.matmul_4bit(x, st[0], *st[1:], bs, quant_type, N, K, bias, A, B, 0.5)
        _ran_cuda("matmul_4bit")
        assert len(seen.options) == 1
        assert bool(seen.options[0] & cuda_backend._GEMV_MMA_GEMM_COMPACT) == compact
    torch.cuda.synchronize()
    exp = x.double() @ W64.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(out[True], exp) < 1e-2
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("M,compact,splits", [(17, True, None), (32, True, 3), (40, False, 2), (64, False, 8)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,bs,quant_type,nested", _TABLE_GEMM_WEIGHTS)
def test_mma_gemm_cluster_sums_give_the_finalizes_bits(monkeypatch, M, compact, splits, dt, N, K, bs, quant_type,
                                                       nested):
    """The table GEMM's K-splits summed in a thread-block cluster (GEMV_MMA_GEMM_CLUSTER, sm_90+: the
    splits' sums through distributed shared memory, bias and LoRA by the kernel, no finalize) add the
    same numbers in the same order as the finalize: at the same 2..8 splits its output equals the
    finalize's bit for bit, in both forms, and agrees with the float64 reference; the option bit
    reaches the C call only with the setting on."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM_COMPACT", compact)
    dev = torch.device(DEV)
    need = cuda_backend._MMA_GEMM_COMPACT_SMEM_BYTES[32 if M <= 32 else 64] if compact else \
        cuda_backend._MMA_GEMM_SMEM_BYTES
    if not cuda_backend._mma_fits(torch.cuda.current_device(), need):
        pytest.skip("this GPU does not grant the table GEMM its shared memory")
    assert cuda_backend._gemv_kernel(M, N, K, dt, bs, dev) == "mma-gemm"
    # The asked splits (or the heuristic's, at most 8), as the split rule leaves them, at least 2.
    monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", None)
    want = splits or min(8, cuda_backend._gemv_split_count(M, N, K, dt, bs, dev))
    monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", max(2, want))
    S = cuda_backend._gemv_split_count(M, N, K, dt, bs, dev)
    assert 2 <= S <= 8
    st, W64 = _weight(N, K, bs, quant_type, nested, seed=N + K + 9)
    x = _rand((M, K), dt, 141 + M)
    bias = _rand((N,), torch.float32, 142)
    A, B = _rand((8, K), dt, 143, 0.1), _rand((N, 8), dt, 144, 0.1)
    out = _matmul_per_setting(monkeypatch, "GEMV_MMA_GEMM_CLUSTER", (False, True), x, st, bs, quant_type, N, K,
                              bias, A, B)
    for cluster, (_, options) in out.items():
        assert bool(options & cuda_backend._GEMV_MMA_GEMM_CLUSTER) == cluster
        assert bool(options & cuda_backend._GEMV_MMA_GEMM_COMPACT) == compact
    exp = x.double() @ W64.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(out[True][0], exp) < 1e-2
    assert torch.equal(out[True][0], out[False][0])
    # Whether the cluster sums ran (all clusters at once) or the C side kept the finalize: one row
    # block's cluster always fits (how many more do depends on the GPCs; the CUDA-graph test below
    # asserts 8 clusters of 4 compact blocks, the sweep labels the rest).
    fits = cuda_backend._mma_gemm_clusters_fit(M, N, S, compact, dt, dev)
    assert fits or N > 128, (M, N, S, compact)


def test_mma_gemm_cluster_sums_in_a_cuda_graph(monkeypatch):
    """The cluster-summed table GEMM captured in a CUDA graph recomputes from a new input on replay
    and gives the eager call's bits (no workspace, nothing left between calls)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM_CLUSTER", True)
    monkeypatch.setattr(cuda_backend, "GEMM_MMA_SPLITS", 4)
    M, K, N = 32, 4096, 1000
    if not cuda_backend._mma_fits(torch.cuda.current_device(), cuda_backend._MMA_GEMM_SMEM_BYTES):
        pytest.skip("this GPU does not grant the table GEMM its shared memory")
    assert cuda_backend._mma_gemm_clusters_fit(M, N, 4, cuda_backend._mma_gemm_compact(M, torch.device(DEV)),
                                               torch.bfloat16, torch.device(DEV))
    st, W64 = _weight(N, K, 64, "nf4", True, seed=47)
    x = _rand((M, K), torch.bfloat16, 48)
    with torch.no_grad(), nf4kit.use_backend("cuda"):
        graph, y = _captured(lambda: ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0))
        _ran_cuda("matmul_4bit")
        x.copy_(_rand((M, K), torch.bfloat16, 49))
        graph.replay()
        torch.cuda.synchronize()
        eager = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0)
    assert torch.equal(y, eager)
    assert _relerr(y, x.double() @ W64.t()) < 1e-2


def test_gemv_mma_leaves_other_inputs_to_the_other_kernels(monkeypatch):
    """With GEMV_MMA on, fp32 x, M > 16, K % 256 != 0 and blocksize 32 take the other kernels, and
    still agree with the reference."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", True)
    for M, K, bs, dt in ((1, 2048, 64, torch.float32), (17, 2048, 64, torch.bfloat16),
                         (1, 2048 + 64, 64, torch.bfloat16), (1, 2048, 32, torch.float16)):
        N = 45
        assert cuda_backend._gemv_kernel(M, N, K, dt, bs) != "mma"
        st, W64 = _weight(N, K, bs, "nf4", True, seed=M + K + bs)
        x = _rand((M, K), dt, 95)
        with nf4kit.use_backend("cuda"):
            y = ops.matmul_4bit(x, st[0], *st[1:], bs, "nf4", N, K, None, None, None, 1.0)
        _ran_cuda("matmul_4bit")
        assert _relerr(y, x.double() @ W64.t()) < _tol(dt)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [
    (1037, 4096),    # W = 16: one block spans the row, y written by the kernel (no finalize)
    (1037, 14336),   # W = 14: 4 parts, 4 slices for the finalize
    (20011, 3072),   # W = 12, one block per row; 1251 row blocks, several visits per warp
    (77, 5120),      # W = 10, 2 parts; the last row block runs past N
    (501, 11008),    # 43 tiles: W = 15, 3 parts, the last with 13 active warps (2 idle)
    (300, 1792)])    # 7 tiles: no block reduce, the plain kernel and finalize
def test_gemv_mma_block_reduce_sums_the_plain_kernels_tiles(monkeypatch, depth, dt, N, K):
    """The block-reduced M = 1 kernel (GEMV_MMA_BLOCK_REDUCE, the default) adds the plain kernel's
    per-tile sums, bracketed by parts of W tiles (a part's tiles in order, then the parts in the
    finalize's order): bit for bit against that sum of the plain kernel's partial slices, bias
    included; with LoRA, against float64 and the plain result."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_DEPTH", depth)
    st, W64 = _weight(N, K, 64, "nf4", True, seed=N + K)
    x = _rand((1, K), dt, 111)
    bias = _rand((N,), torch.float32, 112)
    A, B = _rand((8, K), dt, 113, 0.1), _rand((N, 8), dt, 114, 0.1)
    slices = {}
    launch = cuda_backend._launch_gemv

    def keep_partial(*args, **kwargs):  # the plain kernel's per-tile sums, as the finalize found them
        launch(*args, **kwargs)
        slices["partial"] = args[8].clone()

    out = {}
    for block in (False, True):
        monkeypatch.setattr(cuda_backend, "GEMV_MMA_BLOCK_REDUCE", block)
        monkeypatch.setattr(cuda_backend, "_launch_gemv", launch if block else keep_partial)
        assert bool(cuda_backend._gemv_variant(1, N, K, dt, 64, K // 256)[1] & cuda_backend._GEMV_MMA_BLOCK_REDUCE) \
            == block
        with nf4kit.use_backend("cuda"):
            out[block] = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, bias, None, None, 1.0)
            out[block, "lora"] = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, bias, A, B, 0.5)
        _ran_cuda("matmul_4bit")
    T = K // 256
    tiles = slices["partial"].view(T, N)
    W = cuda_backend._mma_block_warps(T) or 1  # no block reduce: the plain finalize's order
    total = torch.zeros(N, dtype=torch.float32, device=DEV)
    for b0 in range(0, T, W):  # the parts of a row, the last one maybe shorter
        part_sum = torch.zeros(N, dtype=torch.float32, device=DEV)
        for t in range(b0, min(b0 + W, T)):
            part_sum = part_sum + tiles[t]
        total = total + part_sum if W < T else part_sum
    assert torch.equal(out[True], (total + bias).to(dt).view(1, N))
    exp = x.double() @ W64.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(out[True, "lora"], exp) < _tol(dt)
    ulp = 2.0 ** -7 if dt == torch.bfloat16 else 2.0 ** -9
    assert torch.allclose(out[True, "lora"].float(), out[False, "lora"].float(), rtol=ulp,
                          atol=ulp * float(exp.abs().mean()))


@pytest.mark.parametrize("route", ["gemv", "fused", "dequant"])
def test_matmul_routes(monkeypatch, route):
    """Every matmul route of backends/cuda.py gives the same answer for one M."""
    M, N, K = 6, 136, 256
    monkeypatch.setattr(cuda_backend, "GEMV_MAX_M", 8 if route == "gemv" else 0)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_MAX_M", 16 if route == "gemv" else 0)
    monkeypatch.setattr(cuda_backend, "FUSED_MAX_M", 1024 if route == "fused" else 0)
    st, W64 = _weight(N, K, 64, "nf4", True, seed=11)
    x = _rand((M, K), torch.bfloat16, 8)
    A, B = _rand((4, K), torch.bfloat16, 9, 0.1), _rand((N, 4), torch.bfloat16, 10, 0.1)
    with nf4kit.use_backend("cuda"):
        y = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, A, B, 2.0)
        dx = ops.matmul_4bit_backward_input(y, st[0], *st[1:], 64, "nf4", N, K, A, B, 2.0)
    _ran_cuda("matmul_4bit_backward_input")
    exp = x.double() @ W64.t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(y, exp) < 1e-2
    expdx = y.double() @ W64 + 2.0 * (y.double() @ B.double()) @ A.double()
    assert _relerr(dx, expdx) < 1e-2


def test_autograd_through_cuda():
    """nf4kit.matmul_4bit forward + backward (x, bias, LoRA grads) served by the cuda kernels."""
    N, K, M = 96, 128, 33
    W = _rand((N, K), torch.float32, 12)
    with nf4kit.use_backend("cuda"):
        packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
        x = _rand((M, K), torch.bfloat16, 13).requires_grad_()
        A = _rand((8, K), torch.bfloat16, 14, 0.1).requires_grad_()
        B = _rand((N, 8), torch.bfloat16, 15, 0.1).requires_grad_()
        y = nf4kit.matmul_4bit(x, packed, qs, lora_A=A, lora_B=B, lora_scale=0.5)
        y.float().square().sum().backward()
    _ran_cuda("matmul_4bit")
    _ran_cuda("matmul_4bit_backward_input")
    W64 = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ W64.t() + 0.5 * (x64 @ A.detach().double().t()) @ B.detach().double().t()
    (y64.square().sum()).backward()
    assert _relerr(x.grad, x64.grad) < 2e-2


# ---------------------------------------------------------------- CUDA graphs
def test_dequantize_cuda_graph_capture():
    n, bs = 8192 + 33, 64
    st = _state(n, bs, "nf4", True, seed=21)
    with nf4kit.use_backend("cuda"):
        ops.dequantize_4bit(*st, bs, "nf4", n, torch.bfloat16)  # warm up outside the graph
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.dequantize_4bit(*st, bs, "nf4", n, torch.bfloat16)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.dequantize_4bit(*st, bs, "nf4", n, torch.bfloat16)
    _ran_cuda("dequantize_4bit")
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref.dequantize_4bit(*st, bs, "nf4", n, torch.bfloat16))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,quant_type,nested", [
    (1037, 4096, "nf4", True),    # W = 16: one block spans the row, y written by the kernel
    (14336, 4096, "nf4", True),   # 896 row blocks over two blocks an SM: several visits per warp
    (4096, 4096, "fp4", False),   # one visit per warp; plain absmax (the slot's second one in q)
    (1037, 14336, "nf4", True),   # W = 14: 4 parts, 4 slices for the finalize
    (77, 5120, "fp4", True),      # W = 10, 2 parts; the last row block runs past N
    (501, 11008, "nf4", False),   # W = 15, 3 parts, the last with 13 active warps (2 idle)
    (300, 1792, "nf4", True)])    # 7 tiles: no block reduce, the plain kernel and finalize
def test_gemv_mma_compact_gives_the_block_reduces_bits(monkeypatch, dt, N, K, quant_type, nested):
    """The compact M = 1 kernel (GEMV_MMA_COMPACT: the table at the shared window's base, x staged in
    shared memory, two blocks an SM) runs the block-reduced kernel's warps, visits and sums: its output
    equals the block reduce's bit for bit, bias and LoRA included, and is within tolerance of float64."""
    monkeypatch.setattr(cuda_backend, "GEMV_MMA", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_BLOCK_REDUCE", True)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_DEPTH", 2)
    if not cuda_backend._mma_fits(torch.cuda.current_device(), cuda_backend._MMA_SMEM_BYTES):
        pytest.skip("this GPU does not grant the block-reduced kernel its shared memory")
    st, W64 = _weight(N, K, 64, quant_type, nested, seed=N + 3 * K)
    x = _rand((1, K), dt, 121)
    bias = _rand((N,), torch.float32, 122)
    A, B = _rand((8, K), dt, 123, 0.1), _rand((N, 8), dt, 124, 0.1)
    for lora in (False, True):
        out = _matmul_per_setting(monkeypatch, "GEMV_MMA_COMPACT", (False, True), x, st, 64, quant_type, N, K, bias,
                                  A if lora else None, B if lora else None)
        for compact, (_, options) in out.items():
            assert bool(options & cuda_backend._GEMV_MMA_COMPACT) == compact
        assert torch.equal(out[True][0], out[False][0])
        exp = x.double() @ W64.t() + bias.double()
        if lora:
            exp = exp + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
        assert _relerr(out[True][0], exp) < _tol(dt)


class _OptionsSeen:
    """Stands in for nf4kit._C's cuda module: records the option bits of every gemv_4bit call."""

    def __init__(self, real):
        self.real, self.options = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def gemv_4bit(self, *args):
        self.options.append(args[15])
        return self.real.gemv_4bit(*args)


def _matmul_per_setting(monkeypatch, setting, values, x, st, bs, quant_type, N, K, bias, A, B):
    """ops.matmul_4bit (LoRA scale 0.5) on the cuda backend once per value of the cuda backend's
    `setting`, each one gemv_4bit call: {value: (y, that call's option bits)}, synchronized."""
    seen = _OptionsSeen(cuda_backend._C())
    monkeypatch.setattr(cuda_backend, "_C", lambda: seen)
    out = {}
    for value in values:
        monkeypatch.setattr(cuda_backend, setting, value)
        seen.options.clear()
        with nf4kit.use_backend("cuda"):
            y = ops.matmul_4bit(x, st[0], *st[1:], bs, quant_type, N, K, bias, A, B, 0.5)
        _ran_cuda("matmul_4bit")
        assert len(seen.options) == 1
        out[value] = (y, seen.options[0])
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("kernel,M,K,dt,settings", [
    ("mma", 1, 14336, torch.bfloat16, dict(GEMV_MMA_BLOCK_REDUCE=False)),    # the plain kernel: S = 56
    ("mma", 16, 4096 + 256, torch.float16, {}),                              # batch kernel, two n-tiles
    ("mma", 1, 14336, torch.float16, dict(GEMV_MMA_BLOCK_REDUCE=True)),     # 4 slices left to the finalize
    ("mma", 1, 14336, torch.bfloat16, dict(GEMV_MMA_BLOCK_REDUCE=True, GEMV_MMA_COMPACT=True)),  # compact form
    ("mma-gemm", 33, 7168, torch.bfloat16, dict(GEMV_MMA_GEMM=True)),       # table GEMM, the heuristic's splits
    ("stream", 1, 3072, torch.bfloat16, dict(GEMV_MMA=False)),
    ("rows", 5, 2048 + 96, torch.float32, {})])
def test_gemv_pdl_finalize_gives_the_ordinary_launchs_bits(monkeypatch, kernel, M, K, dt, settings):
    """The programmatic dependent launch of the finalize (GEMV_PDL, the default on sm_90+) runs the same kernels
    in the same order: its output equals the ordinary launch's bit for bit, bias and LoRA included,
    after every decode kernel.  The option reaches the C call only on sm_90 and up."""
    N = 1000 + 37
    for name, value in settings.items():
        monkeypatch.setattr(cuda_backend, name, value)
    need = {"mma": cuda_backend._MMA_SMEM_BYTES, "mma-gemm": cuda_backend._MMA_GEMM_SMEM_BYTES}.get(kernel, 0)
    if not cuda_backend._mma_fits(torch.cuda.current_device(), need):
        pytest.skip(f"this GPU does not grant the {kernel} kernel its {need} bytes of shared memory")
    assert cuda_backend._gemv_kernel(M, N, K, dt, 64, torch.device(DEV)) == kernel
    st, W64 = _weight(N, K, 64, "nf4", True, seed=K + M + 7)
    x = _rand((M, K), dt, 111)
    bias = _rand((N,), torch.float32, 112)
    A, B = _rand((8, K), dt, 113, 0.1), _rand((N, 8), dt, 114, 0.1)
    out = _matmul_per_setting(monkeypatch, "GEMV_PDL", (False, True), x, st, 64, "nf4", N, K, bias, A, B)
    for pdl, (_, options) in out.items():
        assert bool(options & cuda_backend._GEMV_PDL) == (pdl and torch.cuda.get_device_capability()[0] >= 9)
    exp = x.double() @ W64.t() + bias.double() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    assert _relerr(out[True][0], exp) < _tol(dt)
    assert torch.equal(out[True][0], out[False][0])


def _captured(fn):
    """fn() warmed up on a side stream, then captured in a CUDA graph: (the graph, fn's output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm up off the default stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    return graph, y


def test_gemv_pdl_finalize_in_a_cuda_graph(monkeypatch):
    """Captured in a CUDA graph (the programmatic dependency becomes a graph edge), the PDL finalize
    recomputes from a new input on replay and gives the eager call's bits."""
    monkeypatch.setattr(cuda_backend, "GEMV_PDL", True)
    K, N = 14336, 1000
    st, W64 = _weight(N, K, 64, "nf4", True, seed=43)
    x = _rand((1, K), torch.bfloat16, 44)
    with torch.no_grad(), nf4kit.use_backend("cuda"):
        graph, y = _captured(lambda: ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0))
        _ran_cuda("matmul_4bit")
        x.copy_(_rand((1, K), torch.bfloat16, 45))
        graph.replay()
        torch.cuda.synchronize()
        eager = ops.matmul_4bit(x, st[0], *st[1:], 64, "nf4", N, K, None, None, None, 1.0)
    assert _relerr(y, x.double() @ W64.t()) < 1e-2
    assert torch.equal(y, eager)


def test_layer_decode_gemv_cuda_graph_capture_on_a_side_stream():
    """The M = 1 layer call (no grad: the path that skips the dispatcher) captured in a CUDA graph: the
    GEMV must launch on the capturing stream (the raw current-stream handle), and replay must
    recompute from the new input."""
    K, N = 4096, 1000
    layer = nf4kit.nn.Linear4bit.from_linear(torch.nn.Linear(K, N, bias=True), compute_dtype=torch.bfloat16).to(DEV)
    x = _rand((1, K), torch.bfloat16, 41)
    with torch.no_grad(), nf4kit.use_backend("cuda"):
        graph, y = _captured(lambda: layer(x))
        _ran_cuda("matmul_4bit")
        x.copy_(_rand((1, K), torch.bfloat16, 42))
        graph.replay()
        torch.cuda.synchronize()
        W = layer.dequantize(torch.float32).double()
        expect = x.double() @ W.t() + layer.bias.double()
    assert _relerr(y, expect) < 1e-2


def test_kernel_error_is_raised_with_its_name():
    """A status from C++ becomes a RuntimeError naming the kernel (here: an unsupported blocksize)."""
    from nf4kit.backends import _native

    C = _native.load()
    x = torch.ones(64, device=DEV)
    packed = torch.empty(32, dtype=torch.uint8, device=DEV)
    absmax = torch.empty(1, device=DEV)
    status = C.cuda.quantize_4bit(x.data_ptr(), 0, 64, 48, 0, packed.data_ptr(), absmax.data_ptr(),
                                  torch.cuda.current_stream().cuda_stream)
    with pytest.raises(RuntimeError, match="cuda.quantize_4bit"):
        _native.check(status, "cuda.quantize_4bit")
