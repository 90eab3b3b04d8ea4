"""The op layer: torch.library.opcheck on every custom op, backend dispatch and fallback,
torch.compile tracing, and property tests of every backend against reference.py."""
from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nf4kit
from nf4kit import backends, ops, reference
from nf4kit import format as fmt
from conftest import assert_ran, slow_backend


def _state(shape=(24, 40), blocksize=64, nested=True, quant_type="nf4", device="cpu"):
    A = torch.randn(shape, device=device)
    packed, qs = nf4kit.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return A, packed.reshape(-1), qs


def _op_samples(device):
    A, packed, qs = _state(device=device)
    N, K = qs.shape
    x = torch.randn(5, K, device=device)
    dy = torch.randn(5, N, device=device)
    la, lb = torch.randn(4, K, device=device), torch.randn(N, 4, device=device)
    code = fmt.dynamic_map().to(device)
    q8, am8 = ops.quantize_blockwise(A.reshape(-1), code, 256)
    qi, ai = ops.quantize_absmax_int8(A.reshape(-1), 64)
    sa = ops.state_args(qs)
    return {
        "quantize_4bit": (A, 64, "nf4"),
        "dequantize_4bit": (packed, *sa, 64, "nf4", A.numel(), torch.bfloat16),
        "dequantize_4bit_out": (packed, *sa, 64, "nf4", A.numel(), torch.empty(A.numel(), device=device)),
        "quantize_blockwise": (A.reshape(-1), code, 256),
        "dequantize_blockwise": (q8, am8, code, 256, torch.float32),
        "quantize_absmax_int8": (A.reshape(-1), 64),
        "dequantize_absmax_int8": (qi, ai, 64, torch.float16),
        "matmul_4bit": (x, packed, *sa, 64, "nf4", N, K, torch.randn(N, device=device), la, lb, 0.5),
        "matmul_4bit_backward_input": (dy, packed, *sa, 64, "nf4", N, K, la, lb, 0.5),
    }


@pytest.mark.parametrize("op", list(ops.ALL_OPS))
def test_opcheck(op, backend_device):
    backend, device = backend_device
    args = _op_samples(device)[op]
    torch.library.opcheck(ops.ALL_OPS[op], args, test_utils=("test_schema", "test_faketensor",
                                                             "test_aot_dispatch_static"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_out_matches(dtype, backend_device):
    """out= writes the same bits in place, on every backend (natively or through a copy)."""
    backend, device = backend_device
    _, packed, qs = _state(shape=(37, 53), device=device)
    out = torch.full((37 * 53,), float("nan"), dtype=dtype, device=device)
    res = nf4kit.dequantize_4bit(packed, qs, out=out)
    assert_ran("dequantize_4bit_out", backend)
    assert res.data_ptr() == out.data_ptr() and res.shape == (37, 53)
    with nf4kit.use_backend("torch"):
        assert torch.equal(res.cpu(), nf4kit.dequantize_4bit(packed.cpu(), qs.clone().to("cpu"), dtype=dtype))


def test_matmul_autograd_opcheck():
    _, packed, qs = _state()
    N, K = qs.shape
    x = torch.randn(3, K, requires_grad=True)
    la = torch.randn(4, K, requires_grad=True)
    lb = torch.randn(N, 4, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    torch.library.opcheck(ops.matmul_4bit, (x, packed, *ops.state_args(qs), 64, "nf4", N, K, bias, la, lb, 2.0),
                          test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_dequantize():
    _, packed, qs = _state()
    sa = ops.state_args(qs)

    @torch.compile(fullgraph=True, backend="eager")
    def f(p, a, na, nc, off):
        return ops.dequantize_4bit(p, a, na, nc, off, 64, "nf4", 24 * 40, torch.float32) * 2

    assert torch.equal(f(packed, *sa), nf4kit.dequantize_4bit(packed, qs).reshape(-1) * 2)


def test_use_backend_nesting_and_env(monkeypatch):
    _, packed, qs = _state()
    with nf4kit.use_backend("torch"):
        nf4kit.dequantize_4bit(packed, qs)
        assert_ran("dequantize_4bit", "torch")
        with nf4kit.use_backend("cpu" if "cpu" in nf4kit.available_backends() else "torch") as _:
            nf4kit.dequantize_4bit(packed, qs)
        nf4kit.dequantize_4bit(packed, qs)
        assert_ran("dequantize_4bit", "torch")
    monkeypatch.setenv("NF4KIT_BACKEND", "torch")
    nf4kit.dequantize_4bit(packed, qs)
    assert_ran("dequantize_4bit", "torch")


def test_fallback_when_backend_declines(monkeypatch):
    """A backend returning NotImplemented hands the call to the next one: never a wrong answer."""
    declining = types.SimpleNamespace(NAME="cpu", is_available=lambda: True, serves=lambda d: True,
                                      dequantize_4bit=lambda *a: NotImplemented)
    monkeypatch.setitem(backends._loaded, "cpu", declining)
    _, packed, qs = _state()
    out = nf4kit.dequantize_4bit(packed, qs)
    assert_ran("dequantize_4bit", "torch")
    assert torch.equal(out, nf4kit.reference.dequantize_4bit(packed, *ops.state_args(qs), 64, "nf4", 960,
                                                             torch.float32).view(24, 40))


def test_forced_backend_that_cannot_serve_device_falls_back():
    _, packed, qs = _state()
    with nf4kit.use_backend("cuda"):  # CPU tensors: cuda never serves them
        nf4kit.dequantize_4bit(packed, qs)
    assert backends.last_backend["dequantize_4bit"] != "cuda"


def test_cuda_routing_follows_the_measurements():
    """CUDA tensors: triton first for the backward and for M > 64, cuda otherwise."""
    meta = torch.device("cuda")
    x1, x64, x65 = (torch.empty(m, 8, device="meta") for m in (1, 64, 65))
    assert backends.chain(meta, "dequantize_4bit")[0] == "cuda"
    assert backends.chain(meta, "matmul_4bit_backward_input", (x1,))[0] == "triton"
    assert backends.chain(meta, "matmul_4bit", (x1,))[0] == "cuda"
    assert backends.chain(meta, "matmul_4bit", (x64,))[0] == "cuda"
    assert backends.chain(meta, "matmul_4bit", (x65,))[0] == "triton"
    assert backends.chain(meta, "quantize_4bit")[0] == "cuda"
    with nf4kit.use_backend("triton"):
        assert backends.chain(meta, "dequantize_4bit") == ["triton", "cuda", "torch"]
    assert backends.chain(torch.device("cpu"), "dequantize_4bit") == ["cpu", "torch"]


def test_flat_passes_ready_tensors_through_and_copies_the_rest():
    """The backends' operand helper: a 1-D contiguous tensor in the wanted dtype is returned as is
    (no dispatcher calls on the decode path); anything else comes back flat, contiguous, cast."""
    from nf4kit.backends._native import flat

    t = torch.randn(37)
    assert flat(t) is t and flat(t, torch.float32) is t
    m = torch.randn(6, 7)
    assert torch.equal(flat(m), m.reshape(-1)) and flat(m).shape == (42,)
    strided = m.t()  # not contiguous: same values in row-major order of the view
    f = flat(strided)
    assert f.is_contiguous() and torch.equal(f, strided.reshape(-1))
    h = torch.randn(5).to(torch.bfloat16)
    c = flat(h, torch.float32)
    assert c.dtype == torch.float32 and torch.equal(c, h.float()) and flat(h) is h
    s = torch.tensor(2.5)  # a 0-d offset
    assert flat(s, torch.float32).shape == (1,) and flat(s).item() == 2.5
    evens = torch.arange(20.0)[::2]  # 1-D but strided
    assert flat(evens) is not evens and torch.equal(flat(evens), torch.arange(0.0, 20.0, 2.0))


@pytest.mark.skipif(not getattr(backends._native.load(), "has_cuda", False),
                    reason="nf4kit._C built without its CUDA kernels (NF4KIT_NO_CUDA or no nvcc)")
def test_cuda_gemv_launch_matches_the_binding_without_a_gpu(monkeypatch):
    """backends/cuda.py's GEMV launch passes the argument list the compiled binding takes (a
    mismatch is a TypeError from pybind11); with M = 0 the C entry point refuses before touching
    the GPU, and the status comes back as an error naming the kernel.  Runs in CI, which builds
    the CUDA sources without a GPU."""
    from nf4kit.backends import cuda as cuda_backend

    # GEMV_PDL (on by default) asks the device's compute capability, which needs a GPU; the option
    # bit's plumbing is the next test's.
    monkeypatch.setattr(cuda_backend, "GEMV_PDL", False)
    x = torch.empty((0, 64), dtype=torch.bfloat16)
    packed = torch.zeros(2048, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="cuda.gemv_4bit"):
        cuda_backend._launch_gemv(x, packed, (0, 0, 0, 0, 0), 64, 0, 64, 64, 1, torch.empty(0),
                                  (None, None, None, 0), torch.empty(0), 0)


def test_cuda_gemv_pdl_bit_follows_the_setting_and_the_device(monkeypatch):
    """The programmatic-dependent-launch option (GEMV_PDL, on by default) reaches the C call only when
    it is on and the device has compute capability 9.0+: on an A100 the setting is ignored rather
    than passed to a launch attribute the card lacks.  The C call is a stand-in: this runs without a
    GPU."""
    from nf4kit.backends import cuda as cuda_backend

    seen = []

    class FakeC:
        def gemv_4bit(self, *args):
            seen.append(args[15])  # the option bits
            return 0

    monkeypatch.setattr(cuda_backend, "_C", lambda: FakeC())
    monkeypatch.setattr(cuda_backend, "_device_index", lambda device: 0)
    x = torch.empty((1, 2048), dtype=torch.bfloat16)
    for pdl in (False, True):
        for capable in (False, True):
            monkeypatch.setattr(cuda_backend, "GEMV_PDL", pdl)
            monkeypatch.setattr(cuda_backend, "_pdl_capable", lambda index, capable=capable: capable)
            cuda_backend._launch_gemv(x, torch.empty(0, dtype=torch.uint8), (0, 0, 0, 0, 0), 64, 0, 64, 2048, 8,
                                      torch.empty(0), (None, None, None, 0), torch.empty(0), 0, kernel="mma")
            assert bool(seen[-1] & cuda_backend._GEMV_PDL) == (pdl and capable)
            assert seen[-1] & cuda_backend._GEMV_MMA  # the kernel's own bits are kept


@pytest.mark.skipif(not getattr(backends._native.load(), "has_cuda", False),
                    reason="nf4kit._C built without its CUDA kernels (NF4KIT_NO_CUDA or no nvcc)")
def test_cuda_gemv_stream_option_is_checked_without_a_gpu(monkeypatch):
    """The memory-order stream option of the GEMV takes M = 1, K % 1024 == 0 and exactly K / 1024
    partial slices, the tensor-core option M <= 16, fp16/bf16 x, K % 256 == 0, K / 256 slices,
    blocksize >= 64 and N * K < 2^32 - 256; anything else is refused as a bad argument before any
    CUDA call (so this runs in CI's GPU-less CUDA build).  The Python side sizes the scratch to match."""
    from nf4kit.backends import cuda as cuda_backend
    from nf4kit.backends._native import DTYPE_CODES

    C = backends._native.load().cuda
    fake = 1 << 12  # 16-byte aligned, never dereferenced: every case is refused first
    bf16 = DTYPE_CODES[torch.bfloat16]

    def call(M, K, S, options, depth=4, N=64, blocksize=64, dtype=bf16):
        return C.gemv_4bit(fake, dtype, M, N, K, fake, fake, 0, 0, 0, 0, blocksize, 0, 4, depth, options, S, fake,
                           0, 0, 0, 0, fake, 0)

    stream = cuda_backend._GEMV_STREAM
    assert call(1, 2048, 3, stream) == -1             # S != K / 1024
    assert call(2, 2048, 2, stream) == -1             # M > 1
    assert call(1, 2048 + 32, 2, stream) == -1        # K % 1024 != 0
    assert call(1, 2048, 2, stream | 4096) == -1      # an unknown option bit
    # The retired experiments' bits (pair table, direct epilogue, wide finalize, two chains) are
    # refused beside every kernel, not ignored.
    for retired in (1, 2, 16, 32):
        assert call(1, 2048, 2, retired) == -1
        assert call(1, 2048, 2, stream | retired) == -1
        assert call(1, 2048, 8, cuda_backend._GEMV_MMA | retired, 2) == -1
        assert call(1, 2048, 8, cuda_backend._GEMV_MMA | cuda_backend._GEMV_MMA_BLOCK_REDUCE | retired, 2) == -1
        assert call(32, 2048, 2, cuda_backend._GEMV_MMA_GEMM | retired, 2) == -1
    assert call(1, 2048, 2, cuda_backend._GEMV_MMA_GEMM_COMPACT) == -1  # a table-GEMM bit without it
    gemm = cuda_backend._GEMV_MMA_GEMM                # the table GEMM: M <= 64, S splits that each get a tile
    assert call(65, 2048, 1, gemm, 2) == -2           # past its 64 batch rows
    assert call(32, 2048, 9, gemm, 2) == -1           # more splits than 256-wide tiles
    assert call(32, 4096, 15, gemm, 2) == -1          # 16 tiles in 15 splits: ceil(16 / 2) = 8 splits get them
    assert call(32, 2048 + 32, 1, gemm, 2) == -1      # K % 256 != 0
    assert call(32, 2048, 2, gemm, 2, blocksize=32) == -1
    assert call(32, 2048, 2, gemm, 2, dtype=DTYPE_CODES[torch.float32]) == -1
    assert call(32, 2048, 2, gemm | cuda_backend._GEMV_MMA, 2) == -1  # gemm takes no other kernel beside it
    assert call(32, 2048, 2, gemm, 2, N=1 << 21) == -1  # N * K = 2^32
    compact = cuda_backend._GEMV_MMA_GEMM_COMPACT     # the compact table GEMM: a form of the table GEMM only
    assert call(1, 2048, 2, compact, 2) == -1
    assert call(1, 2048, 8, cuda_backend._GEMV_MMA | compact, 2) == -1
    assert call(32, 2048, 9, gemm | compact, 2) == -1  # the table GEMM's rules still hold
    assert call(65, 2048, 8, gemm | compact, 2) == -2  # past its 64 batch rows
    cluster = cuda_backend._GEMV_MMA_GEMM_CLUSTER     # the splits' cluster sums: the table GEMM, 2..8 splits
    assert call(1, 2048, 2, cluster, 2) == -1
    assert call(1, 2048, 2, stream | cluster) == -1
    assert call(32, 2048, 1, gemm | cluster, 2) == -1  # one split: nothing to sum
    assert call(32, 2560, 10, gemm | cluster, 2) == -1  # 10 splits: past the portable cluster size
    assert call(32, 2048, 9, gemm | compact | cluster, 2) == -1  # the table GEMM's rules still hold
    # Whether the clusters fit: fp16/bf16 x and M <= 64 only, checked before any CUDA call.
    assert C.gemm_table_clusters_fit(bf16, 65, 1000, 0, 2) == (-1, 0)
    assert C.gemm_table_clusters_fit(DTYPE_CODES[torch.float32], 32, 1000, 0, 2) == (-2, 0)
    block = cuda_backend._GEMV_MMA_BLOCK_REDUCE       # the block-reduced kernel: M = 1 with mma only
    assert call(1, 2048, 2, stream | block) == -1
    assert call(3, 2048, 8, cuda_backend._GEMV_MMA | block, 2) == -1
    mma = cuda_backend._GEMV_MMA                      # (each case below breaks one rule, depth 2 is valid)
    m1_compact = cuda_backend._GEMV_MMA_COMPACT       # the compact M = 1 kernel: with mma and the block reduce
    assert call(1, 2048, 8, mma | m1_compact, 2) == -1
    assert call(1, 2048, 2, stream | block | m1_compact) == -1
    assert call(1, 2048, 8, mma | block | m1_compact, 3) == -1            # depth 2
    assert call(2, 2048, 8, mma | block | m1_compact, 2) == -1            # M = 1 (the block reduce's rule)
    assert call(1, 2048, 8, mma | stream, 2) == -1    # mma takes no other option
    assert call(1, 2048, 2, mma, 2) == -1             # S != K / 256
    assert call(17, 2048, 8, mma, 2) == -2            # M > 16: unsupported by any GEMV
    assert call(9, 2048, 8, 0, 2) == -2               # M > 8 without mma: the row kernel's limit
    assert call(1, 2048 + 32, 8, mma, 2) == -1        # K % 256 != 0
    assert call(1, 2048, 8, mma, 2, blocksize=32) == -1  # blocksize 32: a quarter spans two blocks
    assert call(1, 2048, 8, mma, 2, dtype=DTYPE_CODES[torch.float32]) == -1  # no fp32 mma fragments
    assert call(1, 2048, 8, mma, 2, N=1 << 21) == -1  # N * K = 2^32: past the 32-bit absmax indices
    assert call(1, 2048, 8, mma, 4) == -1             # depth 2 or 3 only
    if not torch.cuda.is_available():  # a valid call gets past the checks to the CUDA runtime, which has no GPU
        for M, depth in ((1, 2), (1, 3), (5, 2), (8, 3), (9, 2), (16, 3)):
            assert call(M, 2048, 8, mma, depth) not in (0, -1, -2)
        for depth in (2, 3):  # the block-reduced kernel (with its fallback under 8 tiles: K = 1792)
            assert call(1, 2048, 8, mma | block, depth) not in (0, -1, -2)
            assert call(1, 11008, 43, mma | block, depth) not in (0, -1, -2)
            assert call(1, 1792, 7, mma | block, depth) not in (0, -1, -2)
        for K, S in ((4096, 16), (14336, 56), (1792, 7)):  # the compact form (and the plain kernel under 8 tiles)
            assert call(1, K, S, mma | block | m1_compact, 2) not in (0, -1, -2)
        for M, S in ((17, 1), (32, 3), (33, 8), (64, 2)):
            assert call(M, 2048, S, gemm, 2) not in (0, -1, -2)
        for M, S, form in ((17, 2, compact), (32, 8, 0), (64, 4, compact), (64, 2, 0)):
            assert call(M, 2048, S, gemm | form | cluster, 2) not in (0, -1, -2)
            assert C.gemm_table_clusters_fit(bf16, M, 1000, int(form != 0), S)[0] not in (0, -1, -2)
        for M, S in ((17, 1), (32, 8), (33, 2), (64, 1)):  # two 8-warp blocks an SM, then one of 16 warps
            assert call(M, 2048, S, gemm | compact, 2) not in (0, -1, -2)
        assert call(1, 2048, 2, stream) not in (0, -1, -2)
        assert call(1, 2048 + 32, 3, 0, 2) not in (0, -1, -2)  # the row kernel
        pdl = cuda_backend._GEMV_PDL                  # the finalize's programmatic launch: beside any kernel
        assert call(1, 2048, 8, mma | pdl, 2) not in (0, -1, -2)
        assert call(1, 14336, 56, mma | block | pdl, 2) not in (0, -1, -2)
        assert call(33, 2048, 8, gemm | pdl, 2) not in (0, -1, -2)
        assert call(1, 2048, 2, stream | pdl) not in (0, -1, -2)
        assert call(5, 2048, 4, pdl, 2) not in (0, -1, -2)
    # The routing below is checked from a known start: the table GEMM and the block reduce off
    # (each is switched on where its rules are checked); monkeypatch restores the defaults after.
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM", False)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_GEMM_COMPACT", False)
    monkeypatch.setattr(cuda_backend, "GEMV_MMA_BLOCK_REDUCE", False)
    old = cuda_backend.GEMV_STREAM, cuda_backend.GEMV_MMA
    try:
        cuda_backend.GEMV_STREAM, cuda_backend.GEMV_MMA = True, False
        bf = torch.bfloat16
        assert cuda_backend._gemv_split_count(1, 64, 3072, bf, 64, torch.device("cpu")) == 3
        assert cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 3) == (cuda_backend.GEMV_STREAM_DEPTH, stream)
        assert cuda_backend._gemv_variant(1, 64, 3072 + 32, bf, 64, 3)[1] & stream == 0
        assert cuda_backend._gemv_variant(2, 64, 3072, bf, 64, 3)[1] & stream == 0
        # The tensor-core kernels, where on, take M <= 16 half x with K % 256 == 0, blocksize >= 64 and
        # N * K < 2^32 - 256, with one slice per 256-wide tile; everything else keeps the others.
        cuda_backend.GEMV_MMA = True
        assert cuda_backend._gemv_kernel(1, 64, 3072 + 256, bf, 64) == "mma"
        assert cuda_backend._gemv_split_count(1, 64, 3072 + 256, bf, 64, torch.device("cpu")) == 13
        assert cuda_backend._gemv_variant(1, 64, 3072 + 256, torch.float16, 128, 13) == (cuda_backend.GEMV_MMA_DEPTH, mma)
        assert cuda_backend._gemv_kernel(1, 64, 3072, torch.float32, 64) == "stream"
        assert cuda_backend._gemv_kernel(1, 64, 3072, bf, 32) == "stream"
        assert cuda_backend._gemv_kernel(8, 64, 3072, bf, 64) == "mma"
        assert cuda_backend._gemv_kernel(16, 64, 3072, bf, 64) == "mma"
        assert cuda_backend._gemv_split_count(16, 64, 3072, bf, 64, torch.device("cpu")) == 12
        assert cuda_backend._gemv_kernel(17, 64, 3072, bf, 64) == "none"  # matmul_4bit takes the GEMM there
        assert cuda_backend._gemv_kernel(9, 64, 3072, torch.float32, 64) == "none"  # the row kernel stops at 8
        assert cuda_backend._gemv_kernel(8, 64, 3072, torch.float32, 64) == "rows"
        assert cuda_backend._gemv_kernel(1, 64, 3072 + 32, bf, 64) == "rows"
        assert cuda_backend._gemv_kernel(1, 2 ** 20, 4096, bf, 64) == "stream"  # N * K = 2^32
        # Only where the device grants a block the table's 129 KB of shared memory (not the 99 KB of
        # sm_86/89/120, the RTX cards): there M = 1 keeps the stream kernel, M <= 8 the row kernel.
        fits = cuda_backend._mma_fits
        try:
            for grants, want in ((True, ("mma", "mma")), (False, ("stream", "rows"))):
                cuda_backend._mma_fits = lambda index, grants=grants: grants
                dev0 = torch.device("cuda", 0)
                assert (cuda_backend._gemv_kernel(1, 64, 3072, bf, 64, dev0),
                        cuda_backend._gemv_kernel(8, 64, 3072, bf, 64, dev0)) == want
        finally:
            cuda_backend._mma_fits = fits
        # The opt-in limit as torch reports it, or (torch without it) by arch; the tensor-core GEMVs
        # need 132096 bytes, the table GEMM 198656 (A100: 166912, H100: 232448, RTX 4090: 101376).
        props, optin = torch.cuda.get_device_properties, cuda_backend._smem_optin
        try:
            for attrs, want in ((dict(shared_memory_per_block_optin=101376, major=8, minor=6), (False, False)),
                                (dict(shared_memory_per_block_optin=232448, major=9, minor=0), (True, True)),
                                (dict(shared_memory_per_block_optin=166912, major=8, minor=0), (True, False)),
                                (dict(major=8, minor=9), (False, False)), (dict(major=8, minor=0), (True, False)),
                                (dict(major=9, minor=0), (True, True))):
                torch.cuda.get_device_properties = lambda index, attrs=attrs: types.SimpleNamespace(**attrs)
                cuda_backend._smem_optin = lambda index: optin.__wrapped__(index)
                assert (fits(0), fits(0, cuda_backend._MMA_GEMM_SMEM_BYTES)) == want, attrs
        finally:
            torch.cuda.get_device_properties, cuda_backend._smem_optin = props, optin
        # The row kernel takes no option bit; the stream and tensor-core kernels their own.
        assert cuda_backend._gemv_variant(3, 64, 3072 + 32, bf, 64, 3)[1] == 0
        assert cuda_backend._gemv_variant(1, 64, 3072, torch.float32, 64, 3)[1] == stream
        assert cuda_backend._gemv_variant(1, 64, 3072 + 256, bf, 64, 13)[1] == mma
        # The table GEMM: M = 17..64 with half x, K % 256 == 0, blocksize >= 64; its splits
        # fill the SMs (blocks of 192 rows) and always leave every split a tile.
        cuda_backend.GEMV_MMA_GEMM = True
        sms = cuda_backend._num_sms
        try:
            assert [cuda_backend._gemv_kernel(M, 64, 3072, bf, 64) for M in (16, 17, 64, 65)] == \
                ["mma", "mma-gemm", "mma-gemm", "none"]
            assert cuda_backend._gemv_kernel(32, 64, 3072, torch.float32, 64) == "none"
            assert cuda_backend._gemv_kernel(32, 64, 3072, bf, 32) == "none"
            assert cuda_backend._gemv_kernel(32, 64, 3072 + 32, bf, 64) == "none"
            # 32-bit x offsets: M * K < 2^32 (N * K < 2^32 alone lets a short, very wide W through).
            assert [cuda_backend._gemv_kernel(M, 32, 2**26, bf, 64) for M in (32, 63, 64)] == \
                ["mma-gemm", "mma-gemm", "none"]
            assert cuda_backend._gemv_variant(32, 64, 3072, bf, 64, 3) == (2, gemm)
            cuda_backend._num_sms = lambda index: 132
            dev0 = torch.device("cuda", 0)
            # One wave of 128-row blocks: 14336x4096: 112 blocks, 1 split; 4096x14336: 32 blocks, 4
            # splits (56 tiles, 14 a split); 512x1024: 4 blocks -> 33, but only 4 tiles.
            assert [cuda_backend._gemv_split_count(64, N, K, bf, 64, dev0) for N, K in
                    ((14336, 4096), (4096, 14336), (512, 1024))] == [1, 4, 4]
            cuda_backend.GEMM_MMA_SPLITS = 15
            assert cuda_backend._gemv_split_count(64, 14336, 4096, bf, 64, dev0) == 8  # 16 tiles: 2 a split
            # The compact form (forced on): its option bit; at M <= 32 two blocks an SM in the
            # heuristic (14336x4096: 264 slots / 112 blocks = 2 splits; 4096x14336: 8, 7 tiles each),
            # one above (its 16-warp block: the 8-warp form's splits); 83200 / 99840 bytes, which an
            # RTX 4090's 101376 grant (the 8-warp form's 198656 do not).
            cuda_backend.GEMM_MMA_SPLITS = None
            cuda_backend.GEMV_MMA_GEMM_COMPACT = True
            assert cuda_backend._gemv_variant(32, 64, 3072, bf, 64, 3) == (2, gemm | compact)
            assert cuda_backend._gemv_variant(33, 64, 3072, bf, 64, 3) == (2, gemm | compact)
            assert [cuda_backend._gemv_split_count(M, N, K, bf, 64, dev0) for M, N, K in
                    ((32, 14336, 4096), (17, 4096, 14336), (32, 512, 1024), (64, 14336, 4096),
                     (64, 4096, 14336))] == [2, 8, 4, 1, 4]
            fits = cuda_backend._mma_fits
            try:
                for grants, want in ((101376, ("mma-gemm", "mma-gemm")), (99839, ("mma-gemm", "none")),
                                     (83199, ("none", "none"))):
                    cuda_backend._mma_fits = lambda index, need, grants=grants: grants >= need
                    assert (cuda_backend._gemv_kernel(32, 64, 3072, bf, 64, dev0),
                            cuda_backend._gemv_kernel(33, 64, 3072, bf, 64, dev0)) == want
            finally:
                cuda_backend._mma_fits = fits
            # The default (None): compact at M <= 32 on sm_90+ (where it was measured), the 8-warp form
            # above and elsewhere, and never where the device is not known.
            cuda_backend.GEMV_MMA_GEMM_COMPACT = None
            pdl_capable = cuda_backend._pdl_capable
            try:
                for hopper in (True, False):
                    cuda_backend._pdl_capable = lambda index, hopper=hopper: hopper
                    assert [cuda_backend._mma_gemm_compact(M, dev0) for M in (17, 32, 33, 64)] == \
                        [hopper, hopper, False, False]
                    assert cuda_backend._gemv_variant(32, 64, 3072, bf, 64, 3, device=dev0) == \
                        (2, gemm | (compact if hopper else 0))
                    assert cuda_backend._gemv_variant(64, 64, 3072, bf, 64, 3, device=dev0) == (2, gemm)
                    assert cuda_backend._gemv_split_count(32, 14336, 4096, bf, 64, dev0) == (2 if hopper else 1)
                    assert not cuda_backend._mma_gemm_compact(32, None)
                    # The splits summed in a cluster (when on): 2..8 splits on sm_90+; never where the
                    # device is not known.
                    cluster = cuda_backend._GEMV_MMA_GEMM_CLUSTER
                    cuda_backend.GEMV_MMA_GEMM_CLUSTER = True
                    try:
                        assert [cuda_backend._gemv_variant(64, 64, 3072, bf, 64, S, device=dev0)[1] for S in
                                (1, 2, 8, 9)] == [gemm] + [gemm | cluster if hopper else gemm] * 2 + [gemm]
                        assert cuda_backend._gemv_variant(64, 64, 3072, bf, 64, 2) == (2, gemm)
                    finally:
                        cuda_backend.GEMV_MMA_GEMM_CLUSTER = False
            finally:
                cuda_backend._pdl_capable = pdl_capable
        finally:
            cuda_backend.GEMV_MMA_GEMM, cuda_backend.GEMM_MMA_SPLITS, cuda_backend._num_sms = False, None, sms
            cuda_backend.GEMV_MMA_GEMM_COMPACT = False
        # The block-reduced kernel: M = 1 only, on any ring; its blocks of W warps,
        # a row of K / 256 tiles in ceil(tiles / 16) even parts, none under 8 tiles.
        cuda_backend.GEMV_MMA_BLOCK_REDUCE = True
        try:
            assert cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 12)[1] == mma | block
            assert cuda_backend._gemv_variant(5, 64, 3072, bf, 64, 12)[1] == mma
            assert cuda_backend._gemv_variant(1, 64, 3072, torch.float32, 64, 3)[1] == stream
            # Its compact form (when on): M = 1 with the block reduce at depth 2 only.
            m1_compact = cuda_backend._GEMV_MMA_COMPACT
            assert not cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 12)[1] & m1_compact  # off by default
            cuda_backend.GEMV_MMA_COMPACT = True
            assert cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 12) == (2, mma | block | m1_compact)
            assert cuda_backend._gemv_variant(5, 64, 3072, bf, 64, 12)[1] == mma
            cuda_backend.GEMV_MMA_DEPTH = 3
            assert cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 12) == (3, mma | block)
            cuda_backend.GEMV_MMA_DEPTH, cuda_backend.GEMV_MMA_BLOCK_REDUCE = 2, False
            assert cuda_backend._gemv_variant(1, 64, 3072, bf, 64, 12)[1] == mma
        finally:
            cuda_backend.GEMV_MMA_BLOCK_REDUCE, cuda_backend.GEMV_MMA_COMPACT = False, False
            cuda_backend.GEMV_MMA_DEPTH = 2
        tiles = (16, 56, 12, 20, 32, 43, 54, 74, 11, 8, 7, 4)
        assert [cuda_backend._mma_block_warps(t) for t in tiles] == [16, 14, 12, 10, 16, 15, 14, 15, 11, 8, 0, 0]
        # The decode path asks _gemv_kernel once and hands the answer on: the same plan either way.
        # (The row kernel's split count asks the device for its SMs: only its variant is compared here.)
        cpu = torch.device("cpu")
        for M, K, dt in ((1, 3072, bf), (16, 3072, bf), (1, 3072, torch.float32), (3, 3072 + 32, bf)):
            kernel = cuda_backend._gemv_kernel(M, 64, K, dt, 64)
            if kernel != "rows":
                assert cuda_backend._gemv_split_count(M, 64, K, dt, 64, cpu, kernel) == \
                    cuda_backend._gemv_split_count(M, 64, K, dt, 64, cpu)
            assert cuda_backend._gemv_variant(M, 64, K, dt, 64, 3, kernel) == \
                cuda_backend._gemv_variant(M, 64, K, dt, 64, 3)
    finally:
        cuda_backend.GEMV_STREAM, cuda_backend.GEMV_MMA = old


def test_available_backends_and_build_info():
    avail = nf4kit.available_backends()
    assert "torch" in avail
    info = nf4kit.build_info()
    assert info["backends_available"] == avail
    assert set(info) >= {"cpu_kernels", "cuda_kernels", "cuda_archs", "triton", "torch"}


# ---------------------------------------------------------------- property tests
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 130), blocksize=st.sampled_from(fmt.BLOCKSIZES),
       quant_type=st.sampled_from(fmt.QUANT_TYPES), nested=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale=st.sampled_from([1e-6, 0.02, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_property_backends_match_reference(rows, cols, blocksize, quant_type, nested, dtype, out_dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    with nf4kit.use_backend("torch"):
        p_ref, qs_ref = nf4kit.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        out_ref = nf4kit.dequantize_4bit(p_ref, qs_ref, dtype=out_dtype)
    for b in nf4kit.available_backends():
        for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
            if not backends.get(b).serves(torch.device(device)) or (slow_backend(b, device) and A.numel() > 2048):
                continue
            with nf4kit.use_backend(b):
                p, qs = nf4kit.quantize_4bit(A.to(device), blocksize=blocksize, compress_statistics=nested,
                                             quant_type=quant_type)
                out = nf4kit.dequantize_4bit(p, qs, dtype=out_dtype)
            assert torch.equal(p.cpu(), p_ref), (b, device)
            assert torch.equal(qs.absmax.cpu(), qs_ref.absmax), (b, device)
            assert torch.equal(out.cpu(), out_ref), (b, device)


def test_reference_dequant_is_one_multiply_then_round():
    """out = dtype(fp32(table[c]) * fp32(absmax)) — checked against float64 arithmetic."""
    A = torch.randn(64, 64) * 7
    packed, qs = nf4kit.quantize_4bit(A, compress_statistics=False)
    codes = reference.unpack_codes(packed.reshape(-1), A.numel())
    vals64 = fmt.code_table("nf4").double()[codes] * qs.absmax.double().repeat_interleave(64)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        # the fp32 product of two fp32 values, rounded once more into dt
        expected = vals64.float().to(dt)
        assert torch.equal(nf4kit.dequantize_4bit(packed, qs, dtype=dt).reshape(-1), expected)
