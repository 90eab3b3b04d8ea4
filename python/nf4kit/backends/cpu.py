"""The `cpu` backend: C++ kernels of csrc/cpu through nf4kit._C, CPU tensors only.

Arguments are validated by nf4kit.functional before they get here; this module only
prepares contiguous buffers, picks the kernel and checks the status code.  Anything it
cannot serve returns NotImplemented, and the `torch` backend runs instead.

The C++ side picks at run time AVX-512 kernels (4-bit dequantize, fused GEMVs) when the CPU
has AVX-512 F/BW/VL, AVX2 kernels when it has AVX2/FMA/F16C, else portable ones (see
`isa()`); quantize/dequantize results are bit-identical on every path.

matmul_4bit / matmul_4bit_backward_input never materialise the whole dequantized weight:
  * M <= GEMV_MAX_M (AVX2 / AVX-512 only): one fused C++ kernel decodes the packed weight on the fly
    with fp32 accumulation (forward: OpenMP over output rows; backward: over rows of W with
    per-thread [M, K] accumulators);
  * larger M (or the generic path): the weight is dequantized one tile at a time (a band of rows for
    the forward, a band of columns for the backward) into a transient buffer in the compute
    dtype, and torch's GEMM writes straight into the matching slice of the output.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import format as fmt
from ._native import DTYPE_CODES, QUANT_TYPE_CODES, check, flat, load, ptr

NAME = "cpu"

# Largest M served by the fused small-M kernels, per activation dtype (crossover against the
# tiled path measured on a 2-core AMD EPYC (Zen 4): torch's bf16 GEMM is several times faster
# than its fp32/fp16 GEMM there, so the tiled path takes over earlier for bf16).
GEMV_MAX_M = {torch.float32: 16, torch.float16: 16, torch.bfloat16: 6}
GEMV_T_MAX_M = {torch.float32: 12, torch.float16: 12, torch.bfloat16: 6}
# Transient tile of the large-M path, in elements of the weight (2 Mi elements: 8 MiB fp32,
# 4 MiB bf16 -- L3-resident, and wide enough for torch's GEMM to run at full speed).
TILE_ELEMS = 1 << 21
# C++ implementations that have the fused small-M kernels.
_FUSED_ISAS = ("avx2", "avx512")


def is_available() -> bool:
    C = load()
    return C is not None and bool(getattr(C, "has_cpu", False))


def serves(device: torch.device) -> bool:
    return device.type == "cpu"


def isa() -> str:
    """'avx512', 'avx2' or 'generic': which C++ implementation serves calls on this CPU.

    The C++ side picks the best the CPU has at the first call; NF4KIT_CPU_ISA=avx2|generic
    (or NF4KIT_CPU_GENERIC=1) set before that caps it.
    """
    C = load()
    return C.cpu.isa() if C is not None else "none"


_ISA_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}


def cap_isa(name: str) -> str:
    """Cap the C++ implementation at `name` ('generic', 'avx2', 'avx512'; never above what the
    CPU has) for A/B benchmarks and tests in one process; returns the ISA now serving calls."""
    C = load()
    C.cpu.set_isa_cap(_ISA_LEVELS[name])
    return C.cpu.isa()


def _state(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
           offset: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int, int, int, int]]:
    """(tensors to keep alive, (absmax, absmax_q, nested_absmax, nested_code, offset) pointers)."""
    if nested_absmax is None:
        a = flat(absmax, torch.float32)
        return [a], (ptr(a), 0, 0, 0, 0)
    q = flat(absmax)
    if q.dtype != torch.uint8:
        raise TypeError(f"nested absmax codes must be uint8, got {q.dtype}")
    na = flat(nested_absmax, torch.float32)
    nc = flat(nested_code, torch.float32)
    off = flat(offset, torch.float32)
    return [q, na, nc, off], (0, ptr(q), ptr(na), ptr(nc), ptr(off))


# ---------------------------------------------------------------- 4-bit
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """A (any shape, fp32/fp16/bf16) -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    if A.dtype not in DTYPE_CODES or A.numel() == 0:
        return NotImplemented
    x = flat(A)
    n = x.numel()
    packed = torch.empty(fmt.packed_nbytes(n), dtype=torch.uint8)
    absmax = torch.empty(fmt.num_blocks(n, blocksize), dtype=torch.float32)
    check(load().cpu.quantize_4bit(ptr(x), DTYPE_CODES[x.dtype], n, blocksize, QUANT_TYPE_CODES[quant_type],
                                   ptr(packed), ptr(absmax)), "cpu.quantize_4bit")
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype):
    """packed uint8 [(numel+1)//2] -> [numel] in dtype (fp32/fp16/bf16), double-quant decode fused."""
    if dtype not in DTYPE_CODES or numel == 0:
        return NotImplemented
    out = torch.empty(numel, dtype=dtype)
    dequantize_4bit_out(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, numel, out)
    return out


def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                        nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                        quant_type: str, numel: int, out: torch.Tensor):
    """dequantize_4bit into a preallocated contiguous `out` [numel] (fp32/fp16/bf16)."""
    if out.dtype not in DTYPE_CODES or numel == 0 or not out.is_contiguous() or out.numel() != numel:
        return NotImplemented
    packed = flat(packed)
    keep, (a, aq, na, nc, off) = _state(absmax, nested_absmax, nested_code, offset)
    check(load().cpu.dequantize_4bit(ptr(packed), a, aq, na, nc, off, numel, blocksize,
                                     QUANT_TYPE_CODES[quant_type], ptr(out), DTYPE_CODES[out.dtype]),
          "cpu.dequantize_4bit")
    del keep
    return None


# ---------------------------------------------------------------- 8-bit dynamic map
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """A [n] -> (uint8 [n], absmax fp32 [ceil(n/blocksize)]) with the sorted 256-entry `code`."""
    if A.dtype not in DTYPE_CODES or A.numel() == 0 or code.numel() != 256:
        return NotImplemented
    x = flat(A)
    code = flat(code, torch.float32)
    q = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(fmt.num_blocks(x.numel(), blocksize), dtype=torch.float32)
    check(load().cpu.quantize_blockwise(ptr(x), DTYPE_CODES[x.dtype], x.numel(), blocksize, ptr(code), ptr(q),
                                        ptr(absmax)), "cpu.quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype):
    """uint8 [n] -> [n] in dtype: T(code[q] * absmax[block])."""
    if dtype not in DTYPE_CODES or q.numel() == 0 or code.numel() != 256:
        return NotImplemented
    q = flat(q)
    absmax = flat(absmax, torch.float32)
    code = flat(code, torch.float32)
    out = torch.empty(q.numel(), dtype=dtype)
    check(load().cpu.dequantize_blockwise(ptr(q), ptr(absmax), ptr(code), q.numel(), blocksize, ptr(out),
                                          DTYPE_CODES[dtype]), "cpu.dequantize_blockwise")
    return out


# ---------------------------------------------------------------- int8 absmax
def quantize_absmax_int8(X: torch.Tensor, blocksize: int):
    """X [n] -> (int8 [n], absmax fp32 [nblocks]); blocksize 0 = one scale for the tensor."""
    if X.dtype not in DTYPE_CODES or X.numel() == 0 or blocksize < 0:
        return NotImplemented
    x = flat(X)
    n = x.numel()
    nb = 1 if blocksize == 0 else fmt.num_blocks(n, blocksize)
    q = torch.empty(n, dtype=torch.int8)
    absmax = torch.empty(nb, dtype=torch.float32)
    check(load().cpu.quantize_absmax_int8(ptr(x), DTYPE_CODES[x.dtype], n, blocksize, ptr(q), ptr(absmax)),
          "cpu.quantize_absmax_int8")
    return q, absmax


def dequantize_absmax_int8(q: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype):
    """int8 [n] -> [n] in dtype: T(fp32(q) * fp32(absmax / 127))."""
    if dtype not in DTYPE_CODES or q.numel() == 0 or q.dtype != torch.int8 or blocksize < 0:
        return NotImplemented
    q = flat(q)
    absmax = flat(absmax, torch.float32)
    out = torch.empty(q.numel(), dtype=dtype)
    check(load().cpu.dequantize_absmax_int8(ptr(q), ptr(absmax), q.numel(), blocksize, ptr(out),
                                            DTYPE_CODES[dtype]), "cpu.dequantize_absmax_int8")
    return out


# ---------------------------------------------------------------- matmuls
def _matmul_ok(t: torch.Tensor, blocksize: int, N: int, K: int, cols: int) -> bool:
    # The tile / fused kernels index blocks by shifts: power-of-two blocksizes (all the format allows).
    return (t.dtype in DTYPE_CODES and t.dim() == 2 and t.shape[1] == cols and N > 0 and K > 0 and blocksize > 0
            and blocksize & (blocksize - 1) == 0)


def _tile_rows(total_rows: int, row_len: int) -> int:
    return max(1, min(total_rows, TILE_ELEMS // max(row_len, 1)))


def _weight_args(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                 nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                 quant_type: str) -> tuple[list[torch.Tensor], tuple]:
    """(tensors to keep alive, the packed weight W as the tile and fused kernels take it: (packed, absmax,
    absmax_q, nested_absmax, nested_code, offset) pointers, blocksize, quant type code)."""
    packed = flat(packed)
    keep, state = _state(absmax, nested_absmax, nested_code, offset)
    return [packed, *keep], (ptr(packed), *state, blocksize, QUANT_TYPE_CODES[quant_type])


def _add_lora(y: torch.Tensor, x: torch.Tensor, lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
              lora_scale: float, backward: bool) -> None:
    """y += s·(x·Aᵀ)·Bᵀ (forward) or s·(x·B)·A (backward), in place, in y's dtype."""
    if lora_A is None:
        return
    A, B = lora_A.to(y.dtype), lora_B.to(y.dtype)
    if backward:
        y.addmm_(x @ B, A, alpha=lora_scale)
    else:
        y.addmm_(x @ A.t(), B.t(), alpha=lora_scale)


def _tiled_forward(xc: torch.Tensor, weight: tuple, N: int, K: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """xc [M, K] contiguous -> xc·deq(W)ᵀ + bias, [M, N] in xc.dtype: bands of weight rows, dequantized into
    one transient buffer, GEMM into out[:, band]."""
    cdt = xc.dtype
    out = torch.empty((xc.shape[0], N), dtype=cdt)
    nt = _tile_rows(N, K)
    buf = torch.empty(nt * K, dtype=cdt)
    bc = bias.to(cdt) if bias is not None else None
    for n0 in range(0, N, nt):
        n1 = min(N, n0 + nt)
        w = buf[: (n1 - n0) * K].view(n1 - n0, K)
        check(load().cpu.dequantize_4bit_tile(*weight, N, K, n0, n1, 0, K, ptr(w), DTYPE_CODES[cdt]),
              "cpu.dequantize_4bit_tile")
        if bc is not None:
            torch.addmm(bc[n0:n1], xc, w.t(), out=out[:, n0:n1])
        else:
            torch.mm(xc, w.t(), out=out[:, n0:n1])
    return out


def _tiled_backward(dyc: torch.Tensor, weight: tuple, N: int, K: int) -> torch.Tensor:
    """dyc [M, N] contiguous -> dyc·deq(W), [M, K] in dyc.dtype: bands of weight columns W[:, k0:k1] (N × kt),
    GEMM into dx[:, k0:k1]; every output element is produced by one GEMM (no accumulation across tiles in a
    low dtype)."""
    cdt = dyc.dtype
    dx = torch.empty((dyc.shape[0], K), dtype=cdt)
    kt = _tile_rows(K, N)
    if kt < K:
        kt = max(8, kt - kt % 8)
    buf = torch.empty(N * min(kt, K), dtype=cdt)
    for k0 in range(0, K, kt):
        k1 = min(K, k0 + kt)
        w = buf[: N * (k1 - k0)].view(N, k1 - k0)
        check(load().cpu.dequantize_4bit_tile(*weight, N, K, 0, N, k0, k1, ptr(w), DTYPE_CODES[cdt]),
              "cpu.dequantize_4bit_tile")
        torch.mm(dyc, w, out=dx[:, k0:k1])
    return dx


def _matmul(t: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
            nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, quant_type: str,
            N: int, K: int, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
            lora_B: Optional[torch.Tensor], lora_scale: float, backward: bool):
    """Forward: t = x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N].  Backward: t = dy [M, N] ->
    dy·deq(W) + s·(dy·B)·A, [M, K].  In t.dtype; W [N, K] packed."""
    cols, out_cols = (N, K) if backward else (K, N)
    if not _matmul_ok(t, blocksize, N, K, cols):
        return NotImplemented
    M = t.shape[0]
    if M == 0:
        return torch.empty((0, out_cols), dtype=t.dtype)
    keep, weight = _weight_args(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type)
    if M <= (GEMV_T_MAX_M if backward else GEMV_MAX_M)[t.dtype] and isa() in _FUSED_ISAS:
        # Fused decode + GEMV in fp32 (t converted once); LoRA's M×r term in fp32 with torch.
        tc = t.float().contiguous()
        y = torch.empty((M, out_cols), dtype=torch.float32)
        if backward:
            check(load().cpu.gemv_t_4bit(ptr(tc), M, *weight, N, K, ptr(y)), "cpu.gemv_t_4bit")
        else:
            bf = flat(bias, torch.float32) if bias is not None else None
            check(load().cpu.gemv_4bit(ptr(tc), M, *weight, N, K, ptr(bf), ptr(y)), "cpu.gemv_4bit")
    else:
        # Large M: the weight is dequantized one band at a time, in t.dtype, for torch's GEMM.
        tc = t.contiguous()
        y = _tiled_backward(tc, weight, N, K) if backward else _tiled_forward(tc, weight, N, K, bias)
    _add_lora(y, tc, lora_A, lora_B, lora_scale, backward)
    del keep
    return y.to(t.dtype)


def _matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, quant_type: str,
                N: int, K: int, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                lora_B: Optional[torch.Tensor], lora_scale: float):
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype (W [N, K] packed)."""
    return _matmul(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, bias,
                   lora_A, lora_B, lora_scale, backward=False)


def _matmul_4bit_backward_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                               nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                               offset: Optional[torch.Tensor], blocksize: int, quant_type: str, N: int, K: int,
                               lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], lora_scale: float):
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype."""
    return _matmul(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, None,
                   lora_A, lora_B, lora_scale, backward=True)


def _without_autocast(fn, args: tuple):
    # The ops compute in the dtypes they were given: an enclosing autocast must not recast the
    # torch GEMMs used inside (they mix an fp32 LoRA term or a tile buffer with x).  Entering
    # the context costs ~4 us, so only when autocast is on.
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)
    return fn(*args)


def matmul_4bit(*args):
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype (arguments as reference.matmul_4bit)."""
    return _without_autocast(_matmul_4bit, args)


def matmul_4bit_backward_input(*args):
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype (arguments as reference)."""
    return _without_autocast(_matmul_4bit_backward_input, args)
