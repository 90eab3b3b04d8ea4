"""Shared pieces of the Triton kernels: interpreter detection, device constants (code tables,
midpoints), and the @triton.jit helpers that decode a tile of the packed 4-bit weight.

The 4-bit format (DESIGN.md §3): a tensor is flattened row-major; packed byte i holds element
2i in its high nibble and 2i+1 in its low nibble; block b = elements [b*BS, (b+1)*BS) has the
fp32 scale absmax[b] (or, double-quantized, fp32(fp32(code2[q[b]] * nested[b // 256]) + offset)).
value = fp32(table[code]) * absmax, rounded once into the output dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET must be set before triton is imported (tests/conftest.py does it on CPU).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

NESTED_BLOCKSIZE = 256  # double-quant block size (bitsandbytes' nested blocksize)


def k_align(K: int, cap: int = 4096) -> int:
    """Largest power of two dividing K, capped: a constexpr that tells the kernels whether rows
    start on byte boundaries (>= 2) and whether a tile group of G columns stays in one block."""
    a = 1
    while a < cap and K % (2 * a) == 0:
        a *= 2
    return a


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


_CONST_CACHE: dict = {}


def device_constants(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table fp32 [16], midpoints fp32 [15], sorted position -> code int32 [16]) on `device`.

    Taken from nf4kit.format so that there is one definition of the numbers; cached per device.
    """
    key = (quant_type, str(device))
    if key not in _CONST_CACHE:
        from nf4kit import format as fmt

        table = fmt.code_table(quant_type).to(device=device, dtype=torch.float32).contiguous()
        mids, order = fmt.quant_thresholds(quant_type)
        _CONST_CACHE[key] = (table, mids.to(device=device, dtype=torch.float32).contiguous(),
                             order.to(device=device, dtype=torch.int32).contiguous())
    return _CONST_CACHE[key]


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = ("sms", str(device))
    if key not in _CONST_CACHE:
        _CONST_CACHE[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _CONST_CACHE[key]


def capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    key = ("cap", str(device))
    if key not in _CONST_CACHE:
        _CONST_CACHE[key] = torch.cuda.get_device_capability(device)
    return _CONST_CACHE[key]


def as_ptr_or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A tensor for an unused pointer argument (the kernel never dereferences it)."""
    return t if t is not None else fallback


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _gather_f32(ptrs, INTERP: tl.constexpr):
    """fp32 gather *ptrs (every pointer valid).  On a GPU through inline PTX
    (ld.global.nc.f32): Triton's software pipeliner turns a tl.load gather that feeds tl.dot
    into per-element 4-byte cp.async copies staged in shared memory (measured: 135-590 KB of
    shared memory per program and ~20x slower matmuls); the asm load is left alone and hits
    L1 (the 16-entry table is 64 bytes)."""
    if INTERP:
        return tl.load(ptrs)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs.to(tl.int64)],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED: tl.constexpr,
                 INTERP: tl.constexpr = False):
    """fp32 absmax of blocks `blk` (any shape).  Nested: fp32(code2[q] * nested[blk // 256])
    then + offset as a separate add (the caller's launch disables FMA contraction where the
    result must be bit-exact).  Masked-off lanes read block 0 (a finite value that the
    callers never use)."""
    blk = tl.where(mask, blk, 0)
    if NESTED:
        q = tl.load(absmax_ptr + blk).to(tl.int32)
        c = _gather_f32(ncode_ptr + q, INTERP)
        s = _gather_f32(nabs_ptr + blk // 256, INTERP)
        return c * s + offset
    else:
        return _gather_f32(absmax_ptr + blk, INTERP)


@triton.jit
def _tile_bytes(packed_ptr, rows, c0, climit, N, K, stride_wb, K_ALIGN: tl.constexpr, R: tl.constexpr,
                C: tl.constexpr):
    """The packed bytes of W[rows, c0:c0+C] (columns >= climit read as 0; climit <= K, even
    when K is).  Even K (K_ALIGN >= 2): rows start on a byte -> uint8 [R, C/2], C/2
    contiguous bytes per row (vector loads).  Odd K: the byte of each element, [R, C]."""
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    if K_ALIGN >= 2:
        j = c0 // 2 + tl.arange(0, C // 2)
        return tl.load(packed_ptr + rows64[:, None] * stride_wb + j[None, :],
                       mask=rmask[:, None] & (j < climit // 2)[None, :], other=0)
    else:
        cols = c0 + tl.arange(0, C)
        e = rows64[:, None] * K + cols[None, :]
        return tl.load(packed_ptr + (e >> 1), mask=rmask[:, None] & (cols < climit)[None, :], other=0)


@triton.jit
def _tile_values(b, table_ptr, rows, c0, K, K_ALIGN: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 INTERP: tl.constexpr):
    """Bytes of _tile_bytes -> fp32 table values [R, C] (high nibble = even element)."""
    if K_ALIGN >= 2:
        codes = tl.join(b >> 4, b & 15).reshape(R, C).to(tl.int32)
    else:
        cols = c0 + tl.arange(0, C)
        e = rows.to(tl.int64)[:, None] * K + cols[None, :]
        codes = (b.to(tl.int32) >> ((1 - (e & 1)) * 4).to(tl.int32)) & 15
    return _gather_f32(table_ptr + codes, INTERP)


@triton.jit
def _tile_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, rows, c0, N, K, BS: tl.constexpr, NESTED: tl.constexpr,
                 K_ALIGN: tl.constexpr, R: tl.constexpr, C: tl.constexpr, INTERP: tl.constexpr):
    """fp32 block scales for W[rows, c0:c0+C].  With G = min(BS, C) and K_ALIGN >= G every run
    of G columns lies inside one block: [R, C // G] (one scale per run).  Otherwise (blocks
    cross a run: K not a multiple of G) one scale per element, [R, C]."""
    G: tl.constexpr = BS if BS < C else C
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    if K_ALIGN >= G:
        gcol = c0 + tl.arange(0, C // G) * G
        blk = (rows64[:, None] * K + gcol[None, :]) // BS
        return _block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, rmask[:, None] & (gcol < K)[None, :],
                            NESTED, INTERP)
    else:
        cols = c0 + tl.arange(0, C)
        blk = (rows64[:, None] * K + cols[None, :]) // BS
        return _block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, rmask[:, None] & (cols < K)[None, :],
                            NESTED, INTERP)


@triton.jit
def _apply_scales(v, a, BS: tl.constexpr, K_ALIGN: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """v [R, C] * the scales of _tile_scales, broadcast over each run -> [R, C] fp32."""
    G: tl.constexpr = BS if BS < C else C
    if K_ALIGN >= G:
        if C // G == 1:
            return v * a
        else:
            return (v.reshape(R, C // G, G) * a[:, :, None]).reshape(R, C)
    else:
        return v * a


@triton.jit
def _deq_tile(packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset, table_ptr, rows, c0, N, K, stride_wb,
              BS: tl.constexpr, NESTED: tl.constexpr, K_ALIGN: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
              INTERP: tl.constexpr):
    """Dequantize W[rows, c0:c0+C] of the packed weight W [N, K] -> fp32 [R, C] (0 outside W):
    fp32(table[code]) * fp32(scale), as the reference.  rows: int [R]; c0: a multiple of C.
    K_ALIGN (the power of two dividing K) picks the paths, see _tile_bytes / _tile_scales:
    rows starting mid-byte and blocks crossing rows are handled per element."""
    b = _tile_bytes(packed_ptr, rows, c0, K, N, K, stride_wb, K_ALIGN, R, C)
    v = _tile_values(b, table_ptr, rows, c0, K, K_ALIGN, R, C, INTERP)
    a = _tile_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, rows, c0, N, K, BS, NESTED, K_ALIGN, R, C, INTERP)
    return _apply_scales(v, a, BS, K_ALIGN, R, C)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even.  On a GPU a plain cast (cvt.rn).  Triton's
    interpreter truncates fp32 -> bf16 casts, so there the rounding is done on the bits
    (finite values: add 0x7FFF + lsb, keep the high half)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.  Under the interpreter the operands go to fp32
    (Triton 3.9's interpreter returns garbage for bf16 tl.dot; fp32 products of bf16/fp16
    values are exact, so this is what the tensor cores compute).  fp32 activations use IEEE
    fp32 products (no TF32), so fp32 results meet a 1e-5 relative tolerance."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)




@triton.jit
def _word_values_f32(w, table_ptr, INTERP: tl.constexpr):
    """Packed words w (uint32: 4 bytes = 8 codes, byte q = w >> 8q) -> 8 fp32 tensors
    (h0, l0, h1, l1, h2, l2, h3, l3): hq = table[byte q >> 4] (the even element of byte q),
    lq = table[byte q & 15] (the odd one).  On a GPU without a memory gather per element: every
    lane holds table[laneid & 15] in a register (one load, loop invariant) and shfl.sync.idx
    reads lane (w >> s) & 31 (shfl ignores the index bits above 4, and both half-warps hold
    the table, so no masking): 7 shifts + 8 shuffles per word.  Needs the warp's 32 lanes
    converged, as Triton code without data-dependent branches is."""
    if INTERP:
        c = w.to(tl.int64)
        return (tl.load(table_ptr + ((c >> 4) & 15)), tl.load(table_ptr + (c & 15)),
                tl.load(table_ptr + ((c >> 12) & 15)), tl.load(table_ptr + ((c >> 8) & 15)),
                tl.load(table_ptr + ((c >> 20) & 15)), tl.load(table_ptr + ((c >> 16) & 15)),
                tl.load(table_ptr + ((c >> 28) & 15)), tl.load(table_ptr + ((c >> 24) & 15)))
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 %wv_l, %wv_t, %wv_s<7>;
            .reg .b64 %wv_a;
            mov.u32 %wv_l, %laneid;
            and.b32 %wv_l, %wv_l, 15;
            mad.wide.u32 %wv_a, %wv_l, 4, $9;
            ld.global.nc.b32 %wv_t, [%wv_a];
            shr.b32 %wv_s0, $8, 4;
            shr.b32 %wv_s1, $8, 8;
            shr.b32 %wv_s2, $8, 12;
            shr.b32 %wv_s3, $8, 16;
            shr.b32 %wv_s4, $8, 20;
            shr.b32 %wv_s5, $8, 24;
            shr.b32 %wv_s6, $8, 28;
            shfl.sync.idx.b32 $0, %wv_t, %wv_s0, 31, -1;
            shfl.sync.idx.b32 $1, %wv_t, $8, 31, -1;
            shfl.sync.idx.b32 $2, %wv_t, %wv_s2, 31, -1;
            shfl.sync.idx.b32 $3, %wv_t, %wv_s1, 31, -1;
            shfl.sync.idx.b32 $4, %wv_t, %wv_s4, 31, -1;
            shfl.sync.idx.b32 $5, %wv_t, %wv_s3, 31, -1;
            shfl.sync.idx.b32 $6, %wv_t, %wv_s6, 31, -1;
            shfl.sync.idx.b32 $7, %wv_t, %wv_s5, 31, -1;
            }""", "=r,=r,=r,=r,=r,=r,=r,=r,r,l", [w, table_ptr.to(tl.int64)],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
