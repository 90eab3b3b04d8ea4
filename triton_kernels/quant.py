"""Triton quantize / dequantize kernels, bit-identical to nf4kit/reference.py.

quantize_4bit          one pass: absmax per block, codes, packing (nf4 / fp4, every blocksize)
dequantize_4bit        one launch, double-quant (nested absmax) decode in-kernel
quantize_blockwise     8-bit dynamic-map codes (used for double quant of the absmax)
dequantize_blockwise

Bit-exact kernels launch with enable_fp_fusion=False (no a*b+c -> FMA), divide with
tl.math.div_rn (IEEE, correctly rounded) and round into bf16/fp16 with the default RNE casts.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, NESTED_BLOCKSIZE, _block_scale, _round_to, device_constants

# Bit-exact launches: never contract a*b+c into an FMA (the interpreter ignores the option).
EXACT = {"enable_fp_fusion": False}


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _min_scale(ROWS: tl.constexpr):
    """fp32(1e-38) (a subnormal) as [ROWS], from its bits: a Python 1e-38 literal would be
    typed fp64 by Triton 3.6 (it is below FLT_MIN)."""
    return tl.full([ROWS], 0x006CE3EE, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_4bit_kernel(x_ptr, packed_ptr, absmax_ptr, mid_ptr, order_ptr, n, nbytes, nb,
                          BS: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr):
    """ROWS whole blocks per program: x [ROWS, BS] -> absmax [ROWS], bytes [ROWS, BS/2]."""
    blk0 = tl.program_id(0).to(tl.int64) * ROWS
    r = tl.arange(0, ROWS)
    c = tl.arange(0, BS)
    base = blk0 * BS
    eoff = r[:, None] * BS + c[None, :]
    x = tl.load(x_ptr + base + eoff, mask=(base + eoff) < n, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + blk0 + r, amax, mask=(blk0 + r) < nb)
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.maximum(amax, _min_scale(ROWS)))
    xn = x * inv[:, None]
    # code position = number of the 15 sorted midpoints strictly below xn (ties go low);
    # padding elements are 0.0 and land on the code of 0.0, as the format wants.
    pos = tl.zeros([ROWS, BS], dtype=tl.int32)
    for i in tl.static_range(15):
        pos += (xn > tl.load(mid_ptr + i)).to(tl.int32)
    if FP4:
        pos = tl.load(order_ptr + pos)
    hi, lo = tl.split(pos.reshape(ROWS, BS // 2, 2))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boff = r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + base // 2 + boff, byte, mask=(base // 2 + boff) < nbytes)


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, table_ptr, out_ptr,
                            n, nbytes, nb, BS: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
                            INTERP: tl.constexpr):
    """BLOCK elements per program as [BLOCK/G, G] (G = min(BS, BLOCK)): each row of the tile
    is inside one block, so the (nested) scale is decoded once per row.  16 contiguous packed
    bytes -> 32 outputs per thread: 16-byte loads and stores."""
    G: tl.constexpr = BS if BS < BLOCK else BLOCK
    R: tl.constexpr = BLOCK // G
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    bstart = pid * (BLOCK // 2)
    r = tl.arange(0, R)
    boff = r[:, None] * (G // 2) + tl.arange(0, G // 2)[None, :]
    b = tl.load(packed_ptr + bstart + boff, mask=(bstart + boff) < nbytes, other=0)
    codes = tl.join(b >> 4, b & 15).reshape(R, G).to(tl.int32)
    v = tl.load(table_ptr + codes)
    blk = (start + r * G) // BS
    if NESTED:
        offset = tl.load(offset_ptr)
    else:
        offset = 0.0
    a = _block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, blk < nb, NESTED, INTERP)
    out = _round_to(v * a[:, None], out_ptr.dtype.element_ty, INTERP)
    eoff = r[:, None] * G + tl.arange(0, G)[None, :]
    tl.store(out_ptr + start + eoff, out, mask=(start + eoff) < n)


@triton.jit
def _quantize_blockwise_kernel(x_ptr, q_ptr, absmax_ptr, mid_ptr, n, nb, BS: tl.constexpr, ROWS: tl.constexpr):
    """8-bit: code = number of the 255 sorted midpoints strictly below xn (binary search)."""
    blk0 = tl.program_id(0).to(tl.int64) * ROWS
    r = tl.arange(0, ROWS)
    base = blk0 * BS
    eoff = r[:, None] * BS + tl.arange(0, BS)[None, :]
    emask = (base + eoff) < n
    x = tl.load(x_ptr + base + eoff, mask=emask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + blk0 + r, amax, mask=(blk0 + r) < nb)
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.maximum(amax, _min_scale(ROWS)))
    xn = x * inv[:, None]
    pos = tl.zeros([ROWS, BS], dtype=tl.int32)
    for s in tl.static_range(8):  # steps 128, 64, ..., 1
        t = tl.load(mid_ptr + pos + ((128 >> s) - 1))
        pos = tl.where(t < xn, pos + (128 >> s), pos)
    tl.store(q_ptr + base + eoff, pos.to(tl.uint8), mask=emask)


@triton.jit
def _dequantize_blockwise_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, nb, BS: tl.constexpr,
                                 BLOCK: tl.constexpr, INTERP: tl.constexpr):
    G: tl.constexpr = BS if BS < BLOCK else BLOCK
    R: tl.constexpr = BLOCK // G
    start = tl.program_id(0).to(tl.int64) * BLOCK
    r = tl.arange(0, R)
    eoff = r[:, None] * G + tl.arange(0, G)[None, :]
    emask = (start + eoff) < n
    q = tl.load(q_ptr + start + eoff, mask=emask, other=0).to(tl.int32)
    v = tl.load(code_ptr + q)
    blk = (start + r * G) // BS
    a = tl.load(absmax_ptr + blk, mask=blk < nb, other=0.0)
    tl.store(out_ptr + start + eoff, _round_to(v * a[:, None], out_ptr.dtype.element_ty, INTERP), mask=emask)


# ----------------------------------------------------------------------------- launch parameters
def quantize_rows(blocksize: int) -> int:
    """Blocks per program of the quantize kernels (about 4096 elements per program on a GPU)."""
    per = 1024 if INTERPRET else 4096
    return max(1, per // blocksize)


def quantize_warps(blocksize: int) -> int:
    return 4 if blocksize * quantize_rows(blocksize) <= 2048 else 8


DEQUANT_BLOCK = 8192      # elements per program (4 KiB of packed bytes)
DEQUANT_WARPS = 8
INTERPRET_DEQUANT_BLOCK = 1024


def dequant_block() -> int:
    return INTERPRET_DEQUANT_BLOCK if INTERPRET else DEQUANT_BLOCK


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


# ----------------------------------------------------------------------------- launchers
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (any shape; fp32/fp16/bf16) -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nb = triton.cdiv(n, blocksize)
    nbytes = (n + 1) // 2
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    _, mids, order = device_constants(quant_type, x.device)
    rows = quantize_rows(blocksize)
    _quantize_4bit_kernel[(triton.cdiv(nb, rows),)](
        x, packed, absmax, mids, order, n, nbytes, nb, BS=blocksize, ROWS=rows, FP4=quant_type == "fp4",
        num_warps=quantize_warps(blocksize), **EXACT)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """packed uint8 [(numel+1)//2] -> [numel] in dtype, one launch (nested decode included).

    absmax fp32 [nb], or uint8 [nb] with nested_absmax fp32 [ceil(nb/256)], nested_code fp32
    [256] and offset fp32 0-d.  `out` (contiguous [numel] of dtype) may be given to reuse a buffer.
    """
    packed = packed.reshape(-1).contiguous()
    dev = packed.device
    nb = triton.cdiv(numel, blocksize)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=dev)
    table, _, _ = device_constants(quant_type, dev)
    nested = nested_absmax is not None
    absmax = absmax.contiguous()
    nabs = nested_absmax.contiguous() if nested else absmax
    ncode = nested_code.float().contiguous() if nested else table
    off = offset.reshape(1).float().contiguous() if nested else table
    block = dequant_block()
    _dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, nabs, ncode, off, table, out, numel, (numel + 1) // 2, nb, BS=blocksize, NESTED=nested,
        BLOCK=block, INTERP=INTERPRET, num_warps=DEQUANT_WARPS, **EXACT)
    return out


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """A [n] -> (uint8 [n], absmax fp32 [nb]); `code` sorted fp32 [256].  NotImplemented for
    a blocksize that is not a power of two or a code of another length."""
    if not _is_pow2(blocksize) or blocksize > 4096 or code.numel() != 256:
        return NotImplemented
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nb = triton.cdiv(n, blocksize)
    c = code.to(device=x.device, dtype=torch.float32).reshape(-1)
    mids = ((c[:-1] + c[1:]) * 0.5).contiguous()  # the reference's fp32 midpoints
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    rows = quantize_rows(blocksize)
    _quantize_blockwise_kernel[(triton.cdiv(nb, rows),)](x, q, absmax, mids, n, nb, BS=blocksize, ROWS=rows,
                                                         num_warps=quantize_warps(blocksize), **EXACT)
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype):
    """uint8 [n] -> [n] in dtype: dtype(fp32(code[q]) * fp32(absmax[i // blocksize]))."""
    if not _is_pow2(blocksize) or code.numel() != 256:
        return NotImplemented
    q = q.reshape(-1).contiguous()
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    block = dequant_block()
    _dequantize_blockwise_kernel[(triton.cdiv(n, block),)](
        q, absmax.float().contiguous(), code.float().contiguous(), out, n, absmax.numel(), BS=blocksize,
        BLOCK=block, INTERP=INTERPRET, num_warps=DEQUANT_WARPS, **EXACT)
    return out


def decode_absmax(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 block scales [nb]: itself, or the nested decode (dequantize_blockwise + offset, the
    same two roundings as the reference)."""
    if nested_absmax is None:
        return absmax.float()
    return dequantize_blockwise(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE, torch.float32) + offset
