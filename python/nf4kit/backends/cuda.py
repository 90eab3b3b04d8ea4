"""The `cuda` backend: the hand-written CUDA kernels of csrc/cuda through nf4kit._C.

The kernels compile in CI (sm_80, sm_90) and run where a GPU is present; their self-test, tests
and memcheck passed on an H100 (benchmarks/results/gpu_h100_2026-11-26b/).

Every launch goes to the caller's current stream (`torch.cuda.current_stream().cuda_stream`),
without synchronising and without allocating inside C++ (scratch buffers are torch tensors
made here), so the ops can be captured in CUDA graphs.  A nonzero status raises
RuntimeError naming the kernel (_native.check).

Arguments are validated by nf4kit.functional; this module only checks what its kernels
support (dtype, blocksize, layout, alignment) and returns NotImplemented otherwise, so the
next backend serves the call (never a wrong answer).

Matmul routing (per call, by M = rows of x):
  * M <= GEMV_MAX_M, or M <= GEMV_MMA_MAX_M where the tensor-core GEMV takes the call: decode
    GEMV (packed W streamed once, split-K); with GEMV_MMA_GEMM (on where a block gets its 194 KB
    of shared memory: sm_90/100), M <= 64 on its table decode too.
  * M <= FUSED_MAX_M, fp16/bf16: fused dequant-GEMM on tensor cores, LoRA and bias in the
    same output tile, or split-K with bias and LoRA in the finalize kernel when the output
    tiles alone leave SMs idle.  The backward uses the same kernel reading W transposed.
  * otherwise (large M, fp32 activations, K % 32 != 0, unaligned views): the one-launch
    dequantize kernel into a transient buffer, then cuBLAS (DESIGN.md §5, second regime).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import format as fmt
from ._native import DTYPE_CODES, QUANT_TYPE_CODES, check, flat, load, ptr

NAME = "cuda"

# Routing thresholds (module attributes so benchmarks/tests can move them).
GEMV_MAX_M = 8
# The fused GEMM (split-K below ~4 CTAs per SM) up to M = 64; above, dequantize + cuBLAS
# (H100, 4096x14336: 214 vs ~120 us at M = 256).
FUSED_MAX_M = 64
# Split-K overrides (None: the heuristics _gemv_splits / _gemm_splits); benchmarks sweep them.
GEMV_SPLITS: Optional[int] = None
# Rows per warp of the decode GEMV (1, 2, 4 or 8; swept on the H100: 4 and 8 tie at M = 1, 4 is
# better at M = 4..8).  A cp.async shared-memory ring variant (3-4 stages in flight) measured
# no faster (29-40 us at M = 1 against 26.6 us) and was removed.
GEMV_ROWS = 4
# Chunks per row in each lane's load ring of the M = 1 row kernel (depth - 1 loads in flight per
# row): 2, the double buffer.  3 and 4 (rows <= 4) and 8 (one row) are built for the sweep; on the
# H100 (2026-11-27, results/gpu_h100_2026-11-27/run1) none was faster: 30.6-49 us against 29.2.
GEMV_DEPTH = 2
_GEMV_RINGS = {(r, d) for r in (1, 2, 4) for d in (3, 4)} | {(1, 8)}  # (rows, depth > 2) built for M = 1
# Retired after the H100 timed them without a gain (the numbers stay in benchmarks/results; the C API
# refuses their option bits 1, 2, 16 and 32): the fp16 pair table for the row and stream kernels
# (30.6 us at best against 29.2, gpu_h100_2026-11-27), the row kernel writing y itself at one split
# (27.8 us at best, within that run's spread), the wide finalize (8 warps per 32 outputs: +0.2 / +0.6 us
# beside the block reduce, +0.6 to +6.3 us at M = 16, gpu_h100_2026-11-27c) and two HMMA accumulator
# chains in the M = 1 kernel (-1.1 to +0.6 us, +-0.1 with the block reduce, 27c).
# M = 1 with K % 1024 == 0 where the tensor-core kernel below does not apply (fp32 x, blocksize 32,
# GEMV_MMA off): the memory-order stream kernel.  The row kernel above keeps thousands of separate
# row streams in flight and stalls near 1.1 TB/s on an H100 in every variant, while a copy of the
# same bytes runs at ~3 TB/s; this one reads W in address order
# with a persistent grid (one 1024-wide K-tile per warp, K / 1024 partial slices summed by the
# finalize kernel).  H100, bf16, device time (results/gpu_h100_2026-11-27): 4096x14336 28.0-28.2 us
# (row kernel 29.4-30.2), 14336x4096 27.2-27.6 us (32.3-32.4); depth 8 was slower (32-35 us).
# NF4KIT_CUDA_GEMV_STREAM=0 in the environment keeps the row kernel.
GEMV_STREAM = os.environ.get("NF4KIT_CUDA_GEMV_STREAM", "1") != "0"
GEMV_STREAM_DEPTH = 4
_STREAM_TILE = 1024
# M <= 16 with fp16/bf16 x, K % 256 == 0, blocksize >= 64 and N * K < 2^32 - 256: the stream scheme
# on tensor cores (kGemvMma; the default there, NF4KIT_CUDA_GEMV_MMA=0 turns it off).  One PRMT +
# one shared load per packed byte give an mma A register from a per-lane table of fp16/bf16 pairs,
# x is the B fragment (M > 1: the batch rows are its columns), mma.sync accumulates in fp32: 1.9
# instructions per weight at M = 1, 2.4 at M <= 8, 2.8 at M <= 16 (static sm_90 SASS, kernel_report)
# against 6.1 for the stream kernel.  The table rounds the code values to x's precision (bf16:
# relative error <= 2^-9 per code, as a bf16 dequantize would), so fp32 x keeps the exact kernels.
# H100, bf16, device time (results/gpu_h100_2026-11-27b): M = 1 23.6-24.6 us on both projection
# shapes against the stream kernel's 27.8-28.5; M = 4 and 8 25-27 us against the row kernel's
# 70-144; M = 12 and 16 30-33 us against the fused GEMM's 57-64.  The intercept of ~10 us (the
# finalize launch among it) keeps M = 1 from the ~17 us target; see that README.
GEMV_MMA = os.environ.get("NF4KIT_CUDA_GEMV_MMA", "1") != "0"
GEMV_MMA_MAX_M = 16  # its batch kernel: one n-tile of 8 batch rows up to M = 8, two up to 16
# Visits in its load ring (2 or 3).  run2's sweep (same code, same run): depth 2 was 0.1-1.1 us
# faster in all six M = 1 / 12 / 16 comparisons; run1 (before the absmax joined the ring) had depth 3
# ahead by 1.4 us on one shape.  Depth 2 also holds fewer registers (106 / 127 / 226 against 127 / 128 / 254).
GEMV_MMA_DEPTH = 2
_MMA_TILE = 256
# M = 1 (on by default; NF4KIT_CUDA_GEMV_MMA_BLOCK_REDUCE=0 turns it off): the tensor-core kernel on
# blocks of W warps that own W consecutive K-tiles of the same rows (a row of K / 256 tiles in
# ceil(tiles / 16) parts, _mma_block_warps), so each block sums its warps' tiles in shared memory.
# Where one block spans the row (K <= 4096) it writes y itself, bias and LoRA added, and the finalize
# launch is gone; K = 14336 leaves it 4 slices instead of 56, K = 11008 3 instead of 43.
# Deterministic; the sum is bracketed by parts, so the bits differ from the plain finalize's.
# Under 8 tiles (K < 2048), or where the row sums do not fit the shared memory, the plain kernel runs.
# H100, bf16 (results/gpu_h100_2026-11-27c), with the PDL finalize below: 23.7 us on 4096x14336 and
# 21.2 us on 14336x4096, against 25.3 / 24.3 us for the plain kernel and finalize.
GEMV_MMA_BLOCK_REDUCE = os.environ.get("NF4KIT_CUDA_GEMV_MMA_BLOCK_REDUCE", "1") != "0"
# Off until timed (NF4KIT_CUDA_GEMV_MMA_COMPACT=1 turns it on): the block-reduced M = 1 kernel above in
# 78 KB of shared memory and 64 registers, two blocks an SM instead of one.  Nsight Compute
# (results/gpu_h100_2026-11-27c) put the one-block kernel at 4 warps a scheduler, 0.58 of them eligible,
# one instruction per 2.7 cycles and DRAM 45 % busy: latency-bound.  The compact form puts the table at
# the shared window's base (the 129 KB were mostly the 64 KB alignment) and reads each mma's x fragment
# from a staged copy in shared memory instead of holding 32 registers of it.  The same warps, visits and
# sums: its output equals the block reduce's bit for bit (GPU test).  Depth 2, K < 2^30;
# elsewhere it is not asked for.
GEMV_MMA_COMPACT = os.environ.get("NF4KIT_CUDA_GEMV_MMA_COMPACT", "0") == "1"
# M = 17..64 (on by default where the device grants it 194 KB of shared memory: sm_90/100;
# NF4KIT_CUDA_MMA_GEMM=0 turns it off): fp16/bf16 x, K % 256 == 0, blocksize >= 64, on the tensor-core
# GEMVs' table decode instead of the fused GEMM (7.1 SASS instructions per weight at 64 batch rows
# against the fused GEMM's 13.3): one A fragment of W feeds 4 or 8 mma (one per 8 batch rows), x
# staged per 256-wide tile in shared memory (cp.async, two buffers) for the block's 8 warps (128
# rows), K split (_mma_gemm_splits) so that the blocks fill the SMs.  GEMM_MMA_SPLITS overrides the
# splits.  H100, bf16 (results/gpu_h100_2026-11-27c), 4096x14336 / 14336x4096: M = 32 48.9 / 50.2 us
# against the fused GEMM's 59.8 / 68.1; M = 64 60.8 / 70.5 against 65.2 / 73.1.
GEMV_MMA_GEMM = os.environ.get("NF4KIT_CUDA_MMA_GEMM", "1") != "0"
# The compact table GEMM: the table GEMM above with twice the warps per SM.  The 8-warp kernel runs one
# block per SM (194 KB of shared memory, 174 / 243 registers) and is latency-bound; its 194 KB are
# mostly padding (the table on a 64 KB boundary) and unused table bytes.  The compact form keeps x
# buffer 0 in those bytes and each warp at 4 n-tiles in 128 registers: M <= 32 in 81 KB, two 8-warp
# blocks an SM (the split heuristic counts both); M = 33..64 in 98 KB, one 16-warp block whose warps w
# and w + 8 share 16 W rows, batch rows 0..31 and 32..63.  The same sums in the same order: its output
# equals the 8-warp kernel's bit for bit at the same splits (GPU test).
# Default (unset, None): on at M = 17..32 on sm_90+, where it was measured.  H100, bf16
# (results/gpu_h100_2026-11-27d), 14336x4096 / 4096x14336, M = 32: 40.5 / 40.3 us against the 8-warp
# kernel's 49.9 / 47.8 (ncu: achieved occupancy 22 % against 12 %); M = 64 (the 16-warp form): 72.6 /
# 66.5 against 70.4 / 58.2, so M > 32 keeps the 8-warp kernel.  Not yet run on sm_80/86/89, where the
# 8-warp kernel does not fit and the fused GEMM runs.  NF4KIT_CUDA_MMA_GEMM_COMPACT=1 forces it at
# M = 17..64 on any device that grants its shared memory, =0 turns it off.
_COMPACT_ENV = os.environ.get("NF4KIT_CUDA_MMA_GEMM_COMPACT")
GEMV_MMA_GEMM_COMPACT: Optional[bool] = None if _COMPACT_ENV is None else _COMPACT_ENV == "1"
# sm_90+ (on by default; NF4KIT_CUDA_GEMV_PDL=0 turns it off; ignored below sm_90): the split-K
# finalize after every decode GEMV is launched with programmatic dependent launch.  The GEMV kernels
# signal at their start (griddepcontrol.launch_dependents) and the finalize waits for their partials
# (griddepcontrol.wait), so the finalize's launch and block scheduling overlap the GEMV instead of
# following it.  Same kernels, same sums: the output is bit-identical to the ordinary launch's.  H100
# (results/gpu_h100_2026-11-27c): M = 1 25.4 / 22.7 us against 25.3 / 24.3 (plain kernel), 23.7 against
# 25.3 (block reduce, K = 14336: 4 slices left); M = 16 32.8 / 30.1 against 32.3 / 31.3.
GEMV_PDL = os.environ.get("NF4KIT_CUDA_GEMV_PDL", "1") != "0"
# Off until timed (NF4KIT_CUDA_MMA_GEMM_CLUSTER=1 turns it on; sm_90+ only): the table GEMM's K-splits
# (2..8 of them) of each 128 rows run as one thread-block cluster and add their sums through
# distributed shared memory, in split order, then bias and LoRA: no fp32 partials in global memory and
# no finalize launch.  Under Nsight Compute (results/gpu_h100_2026-11-27e) the finalize after the compact
# kernel at M = 32 on 14336x4096 took 6.7 us against the kernel's 43.  The same sums in the same order:
# its output equals the finalize's bit for bit (GPU test).  Where the row blocks' clusters do not all
# run at once (a cluster sits within one GPC, whose spare SMs idle), the C side keeps the finalize.
GEMV_MMA_GEMM_CLUSTER = os.environ.get("NF4KIT_CUDA_MMA_GEMM_CLUSTER", "0") == "1"
_MMA_GEMM_MAX_CLUSTER = 8  # the portable cluster size (the C side's kMaxClusterSplits)
GEMM_MMA_SPLITS: Optional[int] = None
_MMA_GEMM_ROWS = 128  # rows per block (the C side's kGemmThreads / 32 x 16)
# The C API's option bits (cuda_kernels.h).
_GEMV_STREAM, _GEMV_MMA = 4, 8
_GEMV_MMA_BLOCK_REDUCE, _GEMV_MMA_GEMM, _GEMV_PDL, _GEMV_MMA_GEMM_COMPACT, _GEMV_MMA_GEMM_CLUSTER = \
    64, 128, 256, 512, 1024
_GEMV_MMA_COMPACT = 2048
GEMM_SPLITS: Optional[int] = None
_GEMM_BK = 64  # the fused kernel's K tile: LoRA rank is zero-padded to a multiple of it
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_available() -> bool:
    C = load()
    return C is not None and bool(getattr(C, "has_cuda", False)) and _cuda_present()


@functools.lru_cache(maxsize=None)
def _cuda_present() -> bool:
    # asked on every dispatch; torch.cuda.is_available() costs a few us of Python per call
    return torch.cuda.is_available()


def serves(device: torch.device) -> bool:
    return device.type == "cuda"


def _C():
    return load().cuda


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _device_index(device: torch.device) -> int:
    """The CUDA device index of `device` ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream(device: torch.device) -> int:
    """The caller's current stream on `device`, as a raw cudaStream_t (Triton's launcher and Inductor
    use the same call; torch.cuda.current_stream() builds a Stream object per call)."""
    index = _device_index(device)
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _ok_blocksize(blocksize: int) -> bool:
    return 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0


def _aligned(*ts: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _state(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
           offset: Optional[torch.Tensor]):
    """(pointer tuple for the kernels, tensors to keep alive) or None if unsupported.

    Pointers: (absmax fp32 | 0, absmax_q uint8 | 0, nested_absmax, nested_code, offset); the
    offset stays a device tensor so that no host sync happens.
    """
    if nested_absmax is None:
        a = flat(absmax, torch.float32)
        return (ptr(a), 0, 0, 0, 0), (a,)
    if absmax.dtype != torch.uint8 or nested_code is None or offset is None or nested_code.numel() != 256:
        return None
    q = flat(absmax)
    na = flat(nested_absmax, torch.float32)
    nc = flat(nested_code, torch.float32)
    off = flat(offset, torch.float32)
    return (0, ptr(q), ptr(na), ptr(nc), ptr(off)), (q, na, nc, off)


# ---------------------------------------------------------------- 4-bit
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """A (any shape, fp32/fp16/bf16, CUDA) -> (packed uint8 [(n+1)//2], absmax fp32 [nb])."""
    if A.dtype not in DTYPE_CODES or not _ok_blocksize(blocksize) or A.numel() == 0:
        return NotImplemented
    x = flat(A)
    n = x.numel()
    with torch.cuda.device(x.device):
        packed = torch.empty(fmt.packed_nbytes(n), dtype=torch.uint8, device=x.device)
        absmax = torch.empty(fmt.num_blocks(n, blocksize), dtype=torch.float32, device=x.device)
        check(_C().quantize_4bit(ptr(x), DTYPE_CODES[x.dtype], n, blocksize, QUANT_TYPE_CODES[quant_type],
                                 ptr(packed), ptr(absmax), _stream(x.device)), "cuda.quantize_4bit")
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype):
    """packed uint8 [(numel+1)//2] -> [numel] in dtype; the nested decode runs in the same launch."""
    if dtype not in DTYPE_CODES or not _ok_blocksize(blocksize) or numel <= 0 or packed.dtype != torch.uint8:
        return NotImplemented
    st = _state(absmax, nested_absmax, nested_code, offset)
    if st is None:
        return NotImplemented
    (p_abs, p_q, p_na, p_nc, p_off), _keep = st
    packed = flat(packed)
    with torch.cuda.device(packed.device):
        out = torch.empty(numel, dtype=dtype, device=packed.device)
        check(_C().dequantize_4bit(ptr(packed), p_abs, p_q, p_na, p_nc, p_off, numel, blocksize,
                                   QUANT_TYPE_CODES[quant_type], ptr(out), DTYPE_CODES[dtype],
                                   _stream(packed.device)), "cuda.dequantize_4bit")
    return out


# ---------------------------------------------------------------- 8-bit dynamic map
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """A [n] -> (uint8 [n] nearest entries of the sorted code[256], absmax fp32 [nb])."""
    if A.dtype not in DTYPE_CODES or blocksize <= 0 or blocksize % 2 or code.numel() != 256 or A.numel() == 0:
        return NotImplemented
    x = flat(A)
    code = flat(code, torch.float32)
    with torch.cuda.device(x.device):
        q = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        absmax = torch.empty(fmt.num_blocks(x.numel(), blocksize), dtype=torch.float32, device=x.device)
        check(_C().quantize_blockwise(ptr(x), DTYPE_CODES[x.dtype], x.numel(), blocksize, ptr(code), ptr(q),
                                      ptr(absmax), _stream(x.device)), "cuda.quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype):
    """uint8 [n] -> [n] in dtype: T(code[q] * absmax[i // blocksize])."""
    if (dtype not in DTYPE_CODES or q.dtype != torch.uint8 or blocksize < 16 or blocksize & (blocksize - 1)
            or code.numel() != 256 or q.numel() == 0):
        return NotImplemented
    q = flat(q)
    absmax = flat(absmax, torch.float32)
    code = flat(code, torch.float32)
    with torch.cuda.device(q.device):
        out = torch.empty(q.numel(), dtype=dtype, device=q.device)
        check(_C().dequantize_blockwise(ptr(q), ptr(absmax), ptr(code), q.numel(), blocksize, ptr(out),
                                        DTYPE_CODES[dtype], _stream(q.device)), "cuda.dequantize_blockwise")
    return out


# ---------------------------------------------------------------- matmuls
def _gemv_splits(N: int, K: int, device: torch.device) -> int:
    """K-splits S of the decode GEMV: about one wave of warps (the kernel gives each warp 4 rows
    of one split; ~20 warps fit an SM at its 96 registers), each lane at least one chunk.  The
    factor 16 is the sweep's best on an H100 (4096x14336: S = 2, 26.6 us; S = 3, 30.6 us)."""
    sms = _num_sms(_device_index(device))
    warps_per_split = -(-N // GEMV_ROWS)
    S = max(1, round(sms * 16 / warps_per_split))
    return max(1, min(S, K // 32 // 32, 64))


def _gemm_splits(M: int, N_out: int, K_red: int, device: torch.device) -> int:
    """K-splits of the fused GEMM for small M: output tiles (64 x 64) alone leave most SMs idle
    (M = 16, N = 4096: 64 CTAs on 132 SMs), so the reduction is split until ~4 CTAs per SM,
    keeping at least 4 k-tiles (of 64) per split."""
    sms = _num_sms(_device_index(device))
    tiles = -(-N_out // 64) * -(-M // 64)
    if tiles >= sms * 2:
        return 1
    return max(1, min(round(sms * 4 / tiles), -(-K_red // 64) // 4, 64))


# The tensor-core GEMVs' shared memory per block (the C side's kMmaSmemBytes: the 64 KB per-lane pair
# table on a 64 KB boundary, then the nested absmax code; the table GEMM adds two x buffers of 64
# rows, kMmaGemmSmemBytes).  sm_80/87 grant a block 163 KB and sm_90/100 227 KB, but the consumer parts
# (sm_86, sm_89, sm_120: RTX 30/40/50, A10, L4, L40) only 99 KB: there the other kernels run.
_MMA_SMEM_BYTES = 2 * 65536 + 1024
_MMA_GEMM_SMEM_BYTES = _MMA_SMEM_BYTES + 2 * 64 * 260 * 2  # + two x buffers: sm_90/100 only
# The compact table GEMM (GEMV_MMA_GEMM_COMPACT; C side CompactLayout<32 or 64>): the table and x
# buffer 0 interleaved in 64 KB, x buffer 1 (32 or 64 padded rows of 260 halves), the nested code.
_MMA_GEMM_COMPACT_SMEM_BYTES = {32: 65536 + 32 * 260 * 2 + 1024, 64: 65536 + 64 * 260 * 2 + 1024}
# Where torch does not report the opt-in limit: the limit by arch (CUDA's tables), else 99 KB.
_SMEM_OPTIN_BY_ARCH = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448}


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    """The shared memory device `index` grants one block (bytes)."""
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return optin if optin is not None else _SMEM_OPTIN_BY_ARCH.get((props.major, props.minor), 101376)


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    """Whether device `index` has programmatic dependent launch (compute capability 9.0 and up)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def _mma_fits(index: int, need: int = _MMA_SMEM_BYTES) -> bool:
    """Whether device `index` grants a block `need` bytes of shared memory (the tensor-core GEMVs')."""
    return _smem_optin(index) >= need


def _mma_gemm_compact(M: int, device: Optional[torch.device]) -> bool:
    """Whether the table GEMM at M batch rows on `device` takes the compact form (GEMV_MMA_GEMM_COMPACT:
    True / False as set, None: M <= 32 on sm_90+; never where the device is not known)."""
    if GEMV_MMA_GEMM_COMPACT is not None:
        return GEMV_MMA_GEMM_COMPACT
    return M <= 32 and device is not None and _pdl_capable(_device_index(device))


def _mma_gemm_cluster(splits: int, device: Optional[torch.device]) -> bool:
    """Whether the table GEMM's `splits` K-splits sum in a thread-block cluster (GEMV_MMA_GEMM_CLUSTER):
    2..8 splits on a device with cluster launch (sm_90+; asked only when device is given)."""
    return (GEMV_MMA_GEMM_CLUSTER and 2 <= splits <= _MMA_GEMM_MAX_CLUSTER and device is not None
            and _pdl_capable(_device_index(device)))


def _mma_gemm_clusters_fit(M: int, N: int, splits: int, compact: bool, dtype: torch.dtype,
                           device: torch.device) -> bool:
    """Whether the cluster sums take effect for x [M, *] of `dtype` against W [N, *] at `splits` splits in
    the given form on `device`: all of its ceil(N / 128) clusters run at once (the C side asks
    cudaOccupancyMaxActiveClusters, once per device, form and split count); where not, the kernel
    writes partials and the finalize adds them (the same bits)."""
    with torch.cuda.device(device):
        status, fits = _C().gemm_table_clusters_fit(DTYPE_CODES[dtype], M, N, int(compact), splits)
    check(status, "cuda.gemm_table_clusters_fit")
    return bool(fits)


def _gemv_kernel(M: int, N: int, K: int, dtype: torch.dtype, blocksize: int,
                 device: Optional[torch.device] = None) -> str:
    """Which decode GEMV takes x [M, K] (dtype) against W [N, K] at `blocksize` on `device`: "mma"
    (the tensor-core stream kernel, GEMV_MMA; where the device has its shared memory: _mma_fits, not
    asked when device is None), "mma-gemm" (the table GEMM for M = 17..64, GEMV_MMA_GEMM), "stream"
    (the memory-order kernel, GEMV_STREAM), "rows", or "none" (M past every GEMV's limit: the fused
    GEMM)."""
    table = dtype in _HALF_DTYPES and K % _MMA_TILE == 0 and blocksize >= 64 and N * K < 2**32 - _MMA_TILE
    index = None if device is None else _device_index(device)
    if table and M <= GEMV_MMA_MAX_M and GEMV_MMA and (index is None or _mma_fits(index)):
        return "mma"
    gemm_smem = (_MMA_GEMM_COMPACT_SMEM_BYTES[32 if M <= 32 else 64] if _mma_gemm_compact(M, device)
                 else _MMA_GEMM_SMEM_BYTES)
    # The table GEMM's x offsets are 32-bit as well: M * K < 2^32 (only N < M with K >= 2^26 misses it).
    if table and GEMV_MMA_MAX_M < M <= 64 and M * K < 2**32 and GEMV_MMA_GEMM and \
            (index is None or _mma_fits(index, gemm_smem)):
        return "mma-gemm"
    if M > GEMV_MAX_M:
        return "none"  # matmul_4bit takes the fused GEMM
    if M == 1 and GEMV_STREAM and K % _STREAM_TILE == 0:
        return "stream"
    return "rows"


def _mma_gemm_splits(M: int, N: int, K: int, device: torch.device) -> int:
    """K-splits S of the table GEMM (GEMV_MMA_GEMM; GEMM_MMA_SPLITS if set): its blocks of 128 rows
    (one per SM: the table's shared memory; two in the compact form at M <= 32) alone leave SMs idle below
    N = 128 x SMs, so K splits into as many blocks as fit in one wave, every split at least one
    256-wide tile; S as the C side needs it, S == ceil(T / ceil(T / S))."""
    tiles = K // _MMA_TILE
    if GEMM_MMA_SPLITS:
        S = GEMM_MMA_SPLITS
    else:
        slots = _num_sms(_device_index(device)) * (2 if M <= 32 and _mma_gemm_compact(M, device) else 1)
        S = slots // -(-N // _MMA_GEMM_ROWS)  # a second, part-empty wave would cost a whole one
    S = max(1, min(S, tiles))
    per_split = -(-tiles // S)
    return -(-tiles // per_split)


def _mma_block_warps(tiles_per_row: int) -> int:
    """Warps per block W of the block-reduced M = 1 tensor-core kernel (GEMV_MMA_BLOCK_REDUCE) for
    K / 256 = tiles_per_row (the C side's mma_block_warps): a row of tiles in ceil(tiles / 16) parts
    of W consecutive tiles, as even as they allow (the last part may be shorter); 0 under 8 tiles."""
    if tiles_per_row < 8:
        return 0
    parts = -(-tiles_per_row // 16)
    return -(-tiles_per_row // parts)


def _gemv_split_count(M: int, N: int, K: int, dtype: torch.dtype, blocksize: int, device: torch.device,
                      kernel: Optional[str] = None) -> int:
    """Partial slices S of the decode GEMV (its fp32 scratch is S * M * N): one per K-tile for the
    stream kernels (256 wide for mma, 1024 for stream), else GEMV_SPLITS or the heuristic.
    `kernel`: _gemv_kernel's answer when the caller has it (the decode path asks once per call)."""
    kernel = kernel or _gemv_kernel(M, N, K, dtype, blocksize)
    if kernel == "mma":
        return K // _MMA_TILE
    if kernel == "mma-gemm":
        return _mma_gemm_splits(M, N, K, device)
    if kernel == "stream":
        return K // _STREAM_TILE
    return min(GEMV_SPLITS, K // 32) if GEMV_SPLITS else _gemv_splits(N, K, device)


def _gemv_variant(M: int, N: int, K: int, dtype: torch.dtype, blocksize: int, splits: int,
                  kernel: Optional[str] = None, device: Optional[torch.device] = None) -> tuple[int, int]:
    """(ring depth, option bits) of the decode GEMV for x [M, K], W [N, K] and `splits` K-splits:
    the settings above where that variant is built, else the double buffer and the finalize kernel.
    `kernel` as for _gemv_split_count; `device` decides the default compact form."""
    kernel = kernel or _gemv_kernel(M, N, K, dtype, blocksize)
    if kernel == "mma-gemm":
        compact = _GEMV_MMA_GEMM_COMPACT if _mma_gemm_compact(M, device) else 0
        cluster = _GEMV_MMA_GEMM_CLUSTER if _mma_gemm_cluster(splits, device) else 0
        return 2, _GEMV_MMA_GEMM | compact | cluster
    if kernel == "mma":
        block = _GEMV_MMA_BLOCK_REDUCE if GEMV_MMA_BLOCK_REDUCE and M == 1 else 0
        compact = _GEMV_MMA_COMPACT if GEMV_MMA_COMPACT and block and GEMV_MMA_DEPTH == 2 and K < 2**30 else 0
        return GEMV_MMA_DEPTH, _GEMV_MMA | block | compact
    if kernel == "stream":
        return GEMV_STREAM_DEPTH, _GEMV_STREAM
    return (GEMV_DEPTH if M == 1 and (GEMV_ROWS, GEMV_DEPTH) in _GEMV_RINGS else 2), 0


def _launch_gemv(x: torch.Tensor, packed: torch.Tensor, state: tuple, blocksize: int, quant_type_code: int, N: int,
                 K: int, splits: int, partial: torch.Tensor, epilogue: tuple, y: torch.Tensor, stream: int,
                 kernel: Optional[str] = None) -> None:
    """The decode GEMV (and its finalize) on `stream`: x [M, K] contiguous, packed flat, state the
    five pointers of _state, partial fp32 [splits*M*N], epilogue (bias, s·x·Aᵀ, B, r) of
    _fp32_epilogue, y [M, N] in x.dtype; the variant from the settings above (_gemv_variant)."""
    M = x.shape[0]
    depth, options = _gemv_variant(M, N, K, x.dtype, blocksize, splits, kernel, x.device)
    if GEMV_PDL and _pdl_capable(_device_index(x.device)):
        options |= _GEMV_PDL
    b, lt, lb, r = epilogue
    check(_C().gemv_4bit(ptr(x), DTYPE_CODES[x.dtype], M, N, K, ptr(packed), *state, blocksize, quant_type_code,
                         GEMV_ROWS, depth, options, splits, ptr(partial), ptr(b), ptr(lt), ptr(lb), r, ptr(y), stream),
          "cuda.gemv_4bit")


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    out = t.new_zeros((t.shape[0], cols))
    out[:, : t.shape[1]] = t
    return out


def _fp32_epilogue(x, bias, lora_A, lora_B, lora_scale):
    """(bias fp32 [N], s·(x·Aᵀ) fp32 [M, r], B fp32 [N, r], r) for splitk_finalize; None/0 if absent."""
    b = flat(bias, torch.float32) if bias is not None else None
    if lora_A is None:
        return b, None, None, 0
    lt = ((x.float() @ lora_A.float().t()) * float(lora_scale)).contiguous()
    return b, lt, lora_B.float().contiguous(), lora_A.shape[0]


def _via_dequantize(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, dtype):
    """deq(W) [N, K] in dtype with the dequantize kernel (or the reference if it cannot)."""
    W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K, dtype)
    if W is NotImplemented:
        from .. import reference

        W = reference.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                                      N * K, dtype)
    return W.view(N, K)


def _operands(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
              nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int):
    """(a contiguous, packed flat, the state's 5 pointers, keep-alive) when the matmul kernels take
    these operands: a 2-D [M > 0, *] in a kernel dtype, a valid blocksize, a usable state; else None."""
    if a.dtype not in DTYPE_CODES or a.dim() != 2 or a.shape[0] == 0 or not _ok_blocksize(blocksize):
        return None
    st = _state(absmax, nested_absmax, nested_code, offset)
    if st is None:
        return None
    return a.contiguous(), flat(packed), st[0], st[1]


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, quant_type: str,
                N: int, K: int, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                lora_B: Optional[torch.Tensor], lora_scale: float):
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype (W [N, K], A [r, K], B [N, r])."""
    operands = _operands(x, packed, absmax, nested_absmax, nested_code, offset, blocksize)
    if operands is None:
        return NotImplemented
    x, packed, (p_abs, p_q, p_na, p_nc, p_off), _keep = operands
    M, dt = x.shape[0], x.dtype
    fast = K % 32 == 0 and _aligned(x, packed)
    qt = QUANT_TYPE_CODES[quant_type]
    dev = x.device
    with torch.cuda.device(dev):
        kernel = _gemv_kernel(M, N, K, dt, blocksize, dev) if fast else "none"
        if kernel != "none":
            S = _gemv_split_count(M, N, K, dt, blocksize, dev, kernel)
            partial = torch.empty(S * M * N, dtype=torch.float32, device=dev)
            b, lt, lb, r = _fp32_epilogue(x, bias, lora_A, lora_B, lora_scale)
            y = torch.empty((M, N), dtype=dt, device=dev)
            _launch_gemv(x, packed, (p_abs, p_q, p_na, p_nc, p_off), blocksize, qt, N, K, S, partial, (b, lt, lb, r),
                         y, _stream(dev), kernel)
            return y
        if fast and dt in _HALF_DTYPES and M <= FUSED_MAX_M:
            y = torch.empty((M, N), dtype=dt, device=dev)
            splits = GEMM_SPLITS if GEMM_SPLITS else _gemm_splits(M, N, K, dev)
            if splits > 1:  # fp32 partials; bias and LoRA in the finalize kernel
                partial = torch.empty(splits * M * N, dtype=torch.float32, device=dev)
                b, lt, lb, r = _fp32_epilogue(x, bias, lora_A, lora_B, lora_scale)
                check(_C().gemm_4bit(DTYPE_CODES[dt], 0, ptr(x), M, N, K, ptr(packed), p_abs, p_q, p_na, p_nc,
                                     p_off, blocksize, qt, 0, 0, 0, ptr(b), ptr(y), splits, ptr(partial), ptr(lt),
                                     ptr(lb), r, _stream(dev)), "cuda.gemm_4bit(forward, split-K)")
                return y
            A2 = B2 = None
            R = 0
            if lora_A is not None:
                r = lora_A.shape[0]
                R = -(-r // _GEMM_BK) * _GEMM_BK
                t = (x @ lora_A.to(dt).t()).float() * float(lora_scale)
                A2 = _pad_cols(t.to(dt), R)
                B2 = _pad_cols(lora_B.to(dt), R)
            b = flat(bias, torch.float32) if bias is not None else None
            check(_C().gemm_4bit(DTYPE_CODES[dt], 0, ptr(x), M, N, K, ptr(packed), p_abs, p_q, p_na, p_nc, p_off,
                                 blocksize, qt, ptr(A2), ptr(B2), R, ptr(b), ptr(y), 1, 0, 0, 0, 0, _stream(dev)),
                  "cuda.gemm_4bit(forward)")
            return y
        # Large M, fp32, or a layout the fused kernels do not take: dequantize + cuBLAS.
        W = _via_dequantize(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, dt)
        y = torch.nn.functional.linear(x, W, None if bias is None else bias.to(dt))
        if lora_A is not None:
            y = y + lora_scale * ((x @ lora_A.to(dt).t()) @ lora_B.to(dt).t())
        return y


def matmul_4bit_backward_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                               nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                               offset: Optional[torch.Tensor], blocksize: int, quant_type: str, N: int, K: int,
                               lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], lora_scale: float):
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype, W read transposed in place."""
    operands = _operands(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize)
    if operands is None:
        return NotImplemented
    dy, packed, (p_abs, p_q, p_na, p_nc, p_off), _keep = operands
    M, dt = dy.shape[0], dy.dtype
    dev = dy.device
    with torch.cuda.device(dev):
        if (dt in _HALF_DTYPES and K % 32 == 0 and N % 8 == 0 and M <= FUSED_MAX_M and _aligned(dy, packed)):
            A2 = B2 = None
            R = 0
            if lora_A is not None:
                r = lora_A.shape[0]
                R = -(-r // _GEMM_BK) * _GEMM_BK
                u = (dy @ lora_B.to(dt)).float() * float(lora_scale)
                A2 = _pad_cols(u.to(dt), R)
                B2 = lora_A.new_zeros((R, K), dtype=dt)
                B2[:r] = lora_A.to(dt)
            dx = torch.empty((M, K), dtype=dt, device=dev)
            check(_C().gemm_4bit(DTYPE_CODES[dt], 1, ptr(dy), M, N, K, ptr(packed), p_abs, p_q, p_na, p_nc, p_off,
                                 blocksize, QUANT_TYPE_CODES[quant_type], ptr(A2), ptr(B2), R, 0, ptr(dx), 1, 0, 0, 0,
                                 0, _stream(dev)), "cuda.gemm_4bit(backward)")
            return dx
        W = _via_dequantize(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, dt)
        dx = dy @ W
        if lora_A is not None:
            dx = dx + lora_scale * ((dy @ lora_B.to(dt)) @ lora_A.to(dt))
        return dx


# ---------------------------------------------------------------- self-test
def selftest(verbose: bool = True) -> bool:
    """Runs every kernel once on small odd shapes against reference.py; prints PASS/FAIL lines.

    `python -m nf4kit.backends.cuda` — meant for a first run on a GPU, before the test suite.
    """
    from .. import reference as ref

    if not is_available():
        print("cuda backend not available:", "no _C.cuda" if not getattr(load(), "has_cuda", False) else "no GPU")
        return False
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ok = True

    def report(name: str, passed: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= passed
        if verbose or not passed:
            print(f"{'PASS' if passed else 'FAIL'} {name} {detail}")

    def run(name, fn):
        try:
            fn()
        except Exception as e:  # a launch error must not hide the other kernels' results
            report(name, False, f"raised {type(e).__name__}: {e}")

    def quant_cases():
        for n, bs, qt, dt in [(1, 64, "nf4", torch.float32), (1001, 32, "nf4", torch.bfloat16),
                              (4097, 4096, "fp4", torch.float16), (70001, 128, "nf4", torch.float32)]:
            A = torch.randn(n, generator=g).to(dt).to(dev)
            p, a = quantize_4bit(A, bs, qt)
            rp, ra = ref.quantize_4bit(A, bs, qt)
            report(f"quantize_4bit n={n} bs={bs} {qt} {dt}", torch.equal(p, rp) and torch.equal(a, ra))
            for odt in (torch.float32, torch.float16, torch.bfloat16):
                out = dequantize_4bit(rp, ra, None, None, None, bs, qt, n, odt)
                exp = ref.dequantize_4bit(rp, ra, None, None, None, bs, qt, n, odt)
                report(f"dequantize_4bit n={n} bs={bs} {qt} ->{odt}", torch.equal(out, exp))
            off = ra.double().mean().float()
            code = fmt.dynamic_map().to(dev)
            q, na = quantize_blockwise(ra - off, code, 256)
            rq, rna = ref.quantize_blockwise(ra - off, code, 256)
            report(f"quantize_blockwise nb={ra.numel()}", torch.equal(q, rq) and torch.equal(na, rna))
            d8 = dequantize_blockwise(rq, rna, code, 256, torch.float32)
            report(f"dequantize_blockwise nb={ra.numel()}",
                   torch.equal(d8, ref.dequantize_blockwise(rq, rna, code, 256, torch.float32)))
            out = dequantize_4bit(rp, rq, rna, code, off, bs, qt, n, torch.bfloat16)
            exp = ref.dequantize_4bit(rp, rq, rna, code, off, bs, qt, n, torch.bfloat16)
            report(f"dequantize_4bit nested n={n} bs={bs}", torch.equal(out, exp))

    def mm_cases():
        for M, N, K, dt, lora in [(1, 300, 256, torch.bfloat16, True), (3, 77, 4096, torch.float32, False),
                                  (8, 1000, 96, torch.float16, True), (100, 129, 320, torch.bfloat16, True),
                                  (257, 64, 64, torch.float16, False), (64, 256, 512, torch.bfloat16, True),
                                  (2, 517, 3104, torch.float16, True), (16, 200, 2048, torch.bfloat16, True),
                                  (40, 130, 1024, torch.float16, False)]:
            W = torch.randn(N, K, generator=g).to(dev)
            p, a = ref.quantize_4bit(W, 64, "nf4")
            x = torch.randn(M, K, generator=g).to(dt).to(dev)
            bias = torch.randn(N, generator=g).to(dev)
            A = (torch.randn(8, K, generator=g) * 0.1).to(dev) if lora else None
            B = (torch.randn(N, 8, generator=g) * 0.1).to(dev) if lora else None
            y = matmul_4bit(x, p, a, None, None, None, 64, "nf4", N, K, bias, A, B, 0.5)
            Wd = ref.dequantize_4bit(p, a, None, None, None, 64, "nf4", N * K, torch.float64).view(N, K)
            yr = x.double() @ Wd.t() + bias.double()
            if lora:
                yr = yr + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
            err = ((y.double() - yr).norm() / yr.norm()).item()
            tol = 1e-5 if dt == torch.float32 else 1e-2
            report(f"matmul_4bit M={M} N={N} K={K} {dt} lora={lora}", err < tol, f"rel_err={err:.2e}")
            dy = torch.randn(M, N, generator=g).to(dt).to(dev)
            dx = matmul_4bit_backward_input(dy, p, a, None, None, None, 64, "nf4", N, K, A, B, 0.5)
            dxr = dy.double() @ Wd
            if lora:
                dxr = dxr + 0.5 * (dy.double() @ B.double()) @ A.double()
            err = ((dx.double() - dxr).norm() / dxr.norm()).item()
            report(f"backward_input M={M} N={N} K={K} {dt} lora={lora}", err < tol, f"rel_err={err:.2e}")

    run("quantize/dequantize", quant_cases)
    run("matmuls", mm_cases)
    torch.cuda.synchronize()
    print("cuda selftest:", "ALL PASS" if ok else "FAILURES")
    return ok


if __name__ == "__main__":
    import sys

    sys.exit(0 if selftest() else 1)
