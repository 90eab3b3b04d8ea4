"""Fused 4-bit matmuls: forward Y = X·deq(W)ᵀ + s·(X·Aᵀ)·Bᵀ + bias and backward
dX = dY·deq(W) + s·(dY·B)·A, with W [N, K] packed NF4/FP4 (double-quant decoded in-kernel).

Kernels
  _fused_matmul_kernel  tiles [BLOCK_M, BLOCK_P] of the output, loop over the reduction dim
                        in BLOCK_Q steps: the packed W tile is loaded and dequantized in
                        registers (never materialised in global memory), rounded to the
                        activation dtype like the reference, and fed to tl.dot (tensor cores).
                        FWD=True: W rows are output columns (dot with the transposed tile);
                        FWD=False (backward dX): W rows are the reduction dim — the same packed
                        bytes read in the other order, no repacking.  The LoRA up-projection
                        (L [M, r] = s-less X·Aᵀ or dY·B, computed by one small torch matmul) is
                        added into the same accumulator tile; bias in the epilogue.
  _gemv_kernel          decode path, M <= 16: each program streams BLOCK_N rows of W over
                        its share of K (split-K) once; M == 1 reduces with FMAs, 2..16 uses
                        tl.dot with M padded to 16.  SPLIT_K > 1 writes fp32 partials that
                        _splitk_reduce_kernel sums (deterministic) with bias and LoRA.

Regimes (DESIGN.md §5): M <= GEMV_MAX_M -> gemv; M >= DEQUANT_GEMM_MIN_M on CUDA -> one-launch
dequantize into a transient buffer + cuBLAS (LoRA folded with addmm_); otherwise fused.
The thresholds (module attributes, or NF4KIT_TRITON_GEMV_MAX_M / _DEQUANT_GEMM_MIN_M /
_FUSED_BACKWARD) default to the measured winners, see the comment at the constants.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Triton 3.4+); without it STREAM_PDL stays off
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

from . import quant
from ._common import (INTERPRET, _gather_f32, _deq_tile, _dot, _word_values_f32, _round_to, _tile_bytes, _tile_scales,
                      _tile_values, capability, device_constants, k_align, next_pow2, num_sms)

# Regimes on CUDA, measured on an H100 (Triton 3.6, torch 2.11, bf16, W 4096x14336 = [N, K],
# blocksize 64, double quant; triton_kernels/_bench.py --quick, after the table/scale gathers
# went through _gather_f32):
#   copy bandwidth 2.95 TB/s; dequantize (one launch) 56.3 us = 2.62 TB/s = 89% of copy
#   M = 1:  gemv kernel 35.7 us (BLOCK_N 8, BLOCK_K 1024)   cuBLAS bf16 on dense W: 56.1 us
#           (that was the element path; the word path, see _gemv_kernel, is not timed yet)
#   M = 16: gemv (tl.dot) kernel 107 us                    dequantize + cuBLAS: ~112 us
#   M = 4096: fused forward 2.64 ms (128x128x128)          dequantize + cuBLAS + LoRA: 768 us
#             (cuBLAS F.linear + LoRA on the dense weight: 666 us)
# So: M <= 16 -> gemv kernel; M >= 17 -> one-launch dequantize + cuBLAS (LoRA via addmm_);
# the fused tile kernels stay reachable (thresholds below, or NF4KIT_TRITON_* variables) for
# the benchmark to re-measure the crossover; under the interpreter (CPU tests) the Triton
# kernels always run.
GEMV_MAX_M: int = int(os.environ.get("NF4KIT_TRITON_GEMV_MAX_M", "16"))
# At and above this M (CUDA only): dequantize + cuBLAS; below it the Triton kernels.  0 = never.
DEQUANT_GEMM_MIN_M: int = int(os.environ.get("NF4KIT_TRITON_DEQUANT_GEMM_MIN_M", "17"))
# The backward dX takes dequantize + cuBLAS on CUDA unless this is set to 1 (the fused
# backward kernel was not re-timed after the gather fix; before it, it was 25x slower).
FUSED_BACKWARD: bool = os.environ.get("NF4KIT_TRITON_FUSED_BACKWARD", "0") == "1"
# NF4KIT_TRITON_AUTOTUNE=0: use the first (heuristic) config of each bucket, no tuning runs.
AUTOTUNE: bool = os.environ.get("NF4KIT_TRITON_AUTOTUNE", "1") != "0"
# M = 1 in memory order (_gemv_stream_kernel; the default where K % BLOCK_K == 0, other shapes keep
# the word path; NF4KIT_TRITON_GEMV_STREAM=0 turns it off): a persistent grid whose loads cover one
# contiguous window of W at a time.  STREAM_CONFIG: the row block and K-tile of a program, its
# warps, and programs per SM (the persistent grid: what fits at once; sm_90 static view of this
# default: 64 registers, 32 one-warp programs per SM).  H100, bf16, device time: 4096x14336 22.3 us
# (results/gpu_h100_2026-11-27/run2) and 23.3 us (gpu_h100_2026-11-27b/run1) against the autotuned
# word path's 27.1-27.6; 14336x4096 22.4 us against 24.7; the fastest of 9 configs on both shapes.
GEMV_STREAM: bool = os.environ.get("NF4KIT_TRITON_GEMV_STREAM", "1") != "0"
STREAM_CONFIG: dict = dict(BLOCK_N=1, BLOCK_K=1024, warps=1, programs_per_sm=32)
# On by default on sm_90+ (NF4KIT_TRITON_STREAM_PDL=0 turns it off; never under the interpreter): the
# stream kernel's split-K reduction is launched with programmatic dependent launch (launch_pdl): the
# stream kernel signals at its start (gdc_launch_dependents) and the reduction waits for its partials
# (gdc_wait), so the second launch overlaps the first instead of following it.  The same kernels and
# sums: the output's bits do not change (GPU test).  H100, bf16, 4096x14336 / 14336x4096: 21.6 / 22.0 us
# against 23.4 / 23.2 without (results/gpu_h100_2026-11-27d run1; faster in all eight timings of that
# session, by 0.2-2.4 us); the one outlier of gpu_h100_2026-11-27c (84.7 us against 22.9) recurred
# neither in that session's repeat nor since.
STREAM_PDL: bool = os.environ.get("NF4KIT_TRITON_STREAM_PDL", "1") != "0"
MAX_LORA_RANK = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _fused_matmul_kernel(
        x_ptr, packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, table_ptr, bias_ptr, l_ptr, rm_ptr, out_ptr,
        M, P, Q, N, K, stride_wb, stride_xm, stride_om, stride_lm, stride_rr, stride_rp, RANK, lora_scale,
        M_BUCKET,
        BS: tl.constexpr, NESTED: tl.constexpr, K_ALIGN: tl.constexpr, FWD: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_M: tl.constexpr):
    """out [M, P] = x [M, Q] · Wop + s·L·Rm + bias.  FWD: P = N, Q = K, Wop = deq(W)ᵀ, Rm = Bᵀ.
    Backward: P = K, Q = N, Wop = deq(W), Rm = A.  M_BUCKET is only an autotune key."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    width = GROUP_M * num_p          # grouped order: GROUP_M row tiles share each W tile in L2
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_p = (pid % width) // gsize
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mmask = rm < M
    pmask = rp < P
    if NESTED:
        offset = tl.load(offset_ptr)
    else:
        offset = 0.0
    T: tl.constexpr = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        xt = tl.load(x_rows + rq[None, :], mask=mmask[:, None] & (rq < Q)[None, :], other=0.0)
        if FWD:
            w = _deq_tile(packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset, table_ptr, rp, q0, N, K, stride_wb,
                          BS, NESTED, K_ALIGN, BLOCK_P, BLOCK_Q, INTERP)
            acc = _dot(xt, tl.trans(_round_to(w, T, INTERP)), acc, INTERP, IEEE)
        else:
            w = _deq_tile(packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset, table_ptr, rq, pid_p * BLOCK_P, N, K,
                          stride_wb, BS, NESTED, K_ALIGN, BLOCK_Q, BLOCK_P, INTERP)
            acc = _dot(xt, _round_to(w, T, INTERP), acc, INTERP, IEEE)
    if HAS_LORA:
        j = tl.arange(0, R_PAD)
        lt = tl.load(l_ptr + rm.to(tl.int64)[:, None] * stride_lm + j[None, :],
                     mask=mmask[:, None] & (j < RANK)[None, :], other=0.0)
        rt = tl.load(rm_ptr + j[:, None] * stride_rr + rp.to(tl.int64)[None, :] * stride_rp,
                     mask=(j < RANK)[:, None] & pmask[None, :], other=0.0)
        lacc = _dot(lt, rt, tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32), INTERP, IEEE)
        acc += lora_scale * lacc
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp, mask=pmask, other=0.0).to(tl.float32)[None, :]
    optr = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rp[None, :]
    tl.store(optr, _round_to(acc, T, INTERP), mask=mmask[:, None] & pmask[None, :])


@triton.jit
def _gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, table_ptr, bias_ptr, l_ptr, b_ptr, out_ptr,
        ws_ptr, M, N, K, stride_wb, stride_xm, stride_om, stride_lm, RANK, lora_scale, M_BUCKET,
        BS: tl.constexpr, NESTED: tl.constexpr, K_ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        PREFETCH: tl.constexpr = 1):
    """Decode path, out [M, N] (M <= 16) = x [M, K] · deq(W)ᵀ (+ s·L·Bᵀ + bias).  Program
    (pid_n, pid_s) streams rows [pid_n*BLOCK_N, +BLOCK_N) of W over K-slice pid_s once.
    SPLIT_K == 1: full epilogue, store in x.dtype; else fp32 partials to ws [SPLIT_K, M, N].
    PREFETCH (M = 1 word path): K-steps of W loaded ahead of the one being multiplied (1 or 2)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    if NESTED:
        offset = tl.load(offset_ptr)
    else:
        offset = 0.0
    T: tl.constexpr = x_ptr.dtype.element_ty
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    # M = 1 word path: columns per in-thread chunk (16 packed bytes, one 128-bit load of W per
    # row); it needs K, the blocksize and BLOCK_K to be multiples of it.
    CHUNK: tl.constexpr = 32
    if BLOCK_M == 1:
        # FMA paths, fp32 throughout (no bf16 rounding of W: the ALU, not HBM, would otherwise
        # bound M = 1).  The packed bytes of the next K-step are loaded before this one is used:
        # a register double buffer that keeps two tiles of HBM reads in flight per program.
        if K_ALIGN >= CHUNK and BS % CHUNK == 0 and BLOCK_K % CHUNK == 0:
            # Word path: W is read as 32-bit words [BLOCK_N, BLOCK_K/8] (8 codes each, never
            # interleaved into element order): byte q of word j holds elements 8j+2q (high
            # nibble) and 8j+2q+1 (low), decoded by warp shuffles (_word_values_f32) and paired
            # with x[8j+2q], x[8j+2q+1] (_x_octets: x loaded in the words' own layout, so no
            # layout conversion through shared memory).  Each chunk of CHUNK columns (4 words =
            # one thread's 128-bit load) lies in one block: its dot is an in-thread FMA chain,
            # scaled once and added to a per-chunk accumulator; the cross-thread sum happens
            # once, after the loop.
            NW: tl.constexpr = BLOCK_K // 8          # packed 32-bit words per row and step
            NC: tl.constexpr = BLOCK_K // CHUNK
            rows64 = rn.to(tl.int64)
            wp = packed_ptr
            stride_ww = stride_wb
            row_blk = rows64 * (K // BS)
            acc2 = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
            wlim = (k_hi // CHUNK) * (CHUNK // 8)   # = k_hi / 8, visibly a multiple of 4 words
            wt = _tile_words(wp, rows64, nmask, k_lo // 8, wlim, stride_ww, NW)
            if PREFETCH == 2:  # a third tile in flight (experimental: is M = 1 short of bytes in flight?)
                wt1 = _tile_words(wp, rows64, nmask, (k_lo + BLOCK_K) // 8, wlim, stride_ww, NW)
            else:
                wt1 = wt
            for k0 in range(k_lo, k_hi, BLOCK_K):
                wt_next = _tile_words(wp, rows64, nmask, (k0 + PREFETCH * BLOCK_K) // 8, wlim, stride_ww, NW)
                e0, o0, e1, o1, e2, o2, e3, o3 = _x_octets(x_ptr, k0 // 8, k_hi // 8, NW, INTERP)
                h0, l0, h1, l1, h2, l2, h3, l3 = _word_values_f32(wt, table_ptr, INTERP)
                # one FMA chain per word (8 codes), then 4 words = one chunk summed in-thread
                s = h0 * e0[None, :] + l0 * o0[None, :] + h1 * e1[None, :] + l1 * o1[None, :] + \
                    h2 * e2[None, :] + l2 * o2[None, :] + h3 * e3[None, :] + l3 * o3[None, :]
                part = tl.sum(s.reshape(BLOCK_N, NC, CHUNK // 8), axis=2)
                gcol = k0 + tl.arange(0, NC) * CHUNK
                if K_ALIGN >= BS:     # rows hold whole blocks: block = row * (K / BS) + col / BS
                    blk = row_blk[:, None] + (gcol // BS)[None, :]
                else:
                    blk = (rows64[:, None] * K + gcol[None, :]) // BS
                acc2 += part * _chunk_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, nmask[:, None], NESTED,
                                             INTERP)
                if PREFETCH == 2:
                    wt = wt1
                    wt1 = wt_next
                else:
                    wt = wt_next
            acc = tl.sum(acc2, axis=1)
        else:
            # Element path (odd K, or blocks/runs that a chunk would straddle).  Per run of G
            # columns inside one block: absmax * sum(table[c] * x).
            G: tl.constexpr = BS if BS < BLOCK_K else BLOCK_K
            b = _tile_bytes(packed_ptr, rn, k_lo, k_hi, N, K, stride_wb, K_ALIGN, BLOCK_N, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                b_next = _tile_bytes(packed_ptr, rn, k0 + BLOCK_K, k_hi, N, K, stride_wb, K_ALIGN, BLOCK_N, BLOCK_K)
                rk = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(x_ptr + rk, mask=rk < k_hi, other=0.0).to(tl.float32)
                v = _tile_values(b, table_ptr, rn, k0, K, K_ALIGN, BLOCK_N, BLOCK_K, INTERP)
                a = _tile_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, rn, k0, N, K, BS, NESTED, K_ALIGN, BLOCK_N,
                                 BLOCK_K, INTERP)
                if K_ALIGN >= G:
                    part = tl.sum((v * xv[None, :]).reshape(BLOCK_N, BLOCK_K // G, G), axis=2)
                    acc += tl.sum(part * a, axis=1)
                else:
                    acc += tl.sum(v * a * xv[None, :], axis=1)
                b = b_next
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = _round_to(_deq_tile(packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset, table_ptr, rn, k0, N, K,
                                    stride_wb, BS, NESTED, K_ALIGN, BLOCK_N, BLOCK_K, INTERP), T, INTERP)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & (rk < k_hi)[None, :],
                         other=0.0)
            acc = _dot(xt, tl.trans(w), acc, INTERP, IEEE)
    if SPLIT_K == 1:
        if BLOCK_M == 1:
            acc = _epilogue_row(acc, 0, rn, nmask, bias_ptr, l_ptr, b_ptr, stride_lm, RANK, lora_scale, HAS_BIAS,
                                HAS_LORA, R_PAD)
            tl.store(out_ptr + rn, _round_to(acc, T, INTERP), mask=nmask)
        else:
            if HAS_LORA:
                j = tl.arange(0, R_PAD)
                lt = tl.load(l_ptr + rm[:, None] * stride_lm + j[None, :], mask=mmask[:, None] & (j < RANK)[None, :],
                             other=0.0)
                bt = tl.load(b_ptr + rn.to(tl.int64)[None, :] * RANK + j[:, None],
                             mask=(j < RANK)[:, None] & nmask[None, :], other=0.0)
                acc += lora_scale * _dot(lt, bt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERP, IEEE)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], _round_to(acc, T, INTERP),
                     mask=mmask[:, None] & nmask[None, :])
    else:
        wsp = ws_ptr + pid_s.to(tl.int64) * M * N
        if BLOCK_M == 1:
            tl.store(wsp + rn, acc, mask=nmask)
        else:
            tl.store(wsp + rm[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemv_stream_kernel(x_ptr, packed_ptr, absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, table_ptr, ws_ptr, N, K,
                        stride_wb, ROW_BLOCK_STEP, BS: tl.constexpr, NESTED: tl.constexpr, INTERP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """M = 1 decode in memory order (experimental; K % BLOCK_K == 0, BS a multiple of 32):
    ws[kt, n] = x[kt-th BLOCK_K slice] · deq(W)[n, same slice] for every row n.  Program p owns the
    K-tile kt = p % (K / BLOCK_K), so its x slice is loaded once, and visits the row blocks
    p // (K / BLOCK_K) + j * ROW_BLOCK_STEP: with the grid persistent (ROW_BLOCK_STEP * K / BLOCK_K
    programs), the programs' loads at any moment cover one contiguous window of W, as a copy's do,
    rather than thousands of separate row streams.  The word path's decode (as _gemv_kernel).
    PDL: the reduction launched after it (STREAM_PDL) may be scheduled from the start."""
    if PDL:
        gdc_launch_dependents()
    p = tl.program_id(0)
    TPR = K // BLOCK_K
    kt = p % TPR
    CHUNK: tl.constexpr = 32
    NW: tl.constexpr = BLOCK_K // 8
    NC: tl.constexpr = BLOCK_K // CHUNK
    if NESTED:
        offset = tl.load(offset_ptr)
    else:
        offset = 0.0
    k0 = kt * BLOCK_K
    e0, o0, e1, o1, e2, o2, e3, o3 = _x_octets(x_ptr, k0 // 8, K // 8, NW, INTERP)
    gcol = (k0 + tl.arange(0, NC) * CHUNK).to(tl.int64)
    rows64 = ((p // TPR) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nmask = rows64 < N
    step = ROW_BLOCK_STEP * BLOCK_N
    wt = _tile_words(packed_ptr, rows64, nmask, k0 // 8, K // 8, stride_wb, NW)
    for _ in range(p // TPR, tl.cdiv(N, BLOCK_N), ROW_BLOCK_STEP):
        rows_next = rows64 + step
        mask_next = rows_next < N
        wt_next = _tile_words(packed_ptr, rows_next, mask_next, k0 // 8, K // 8, stride_wb, NW)
        h0, l0, h1, l1, h2, l2, h3, l3 = _word_values_f32(wt, table_ptr, INTERP)
        s = h0 * e0[None, :] + l0 * o0[None, :] + h1 * e1[None, :] + l1 * o1[None, :] + \
            h2 * e2[None, :] + l2 * o2[None, :] + h3 * e3[None, :] + l3 * o3[None, :]
        part = tl.sum(s.reshape(BLOCK_N, NC, CHUNK // 8), axis=2)
        blk = (rows64[:, None] * K + gcol[None, :]) // BS
        part = part * _chunk_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, nmask[:, None], NESTED, INTERP)
        tl.store(ws_ptr + kt.to(tl.int64) * N + rows64, tl.sum(part, axis=1), mask=nmask)
        wt = wt_next
        rows64 = rows_next
        nmask = mask_next


@triton.jit
def _tile_words(wp, rows64, rmask, j0, jlimit, stride_ww, NW: tl.constexpr):
    """Packed W as 32-bit words [R, NW]: words j0.. of each row (0 where j >= jlimit or the
    row is masked); wp: the byte pointer, stride_ww: bytes per row (a multiple of 16 when
    K % 32 == 0: the row offset is computed in bytes so that the loads stay 128-bit)."""
    j = j0 + tl.arange(0, NW)
    rowp = (wp + rows64 * stride_ww).to(tl.pointer_type(tl.uint32))
    return tl.load(rowp[:, None] + j[None, :], mask=rmask[:, None] & (j < jlimit)[None, :], other=0)


@triton.jit
def _chunk_scales(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED: tl.constexpr, INTERP: tl.constexpr):
    """fp32 scales of blocks blk >= 0 (int64), as _block_scale, but with the nested block index
    as a shift (blk is non-negative) and lanes outside `mask` clamped to block 0."""
    blk = tl.where(mask, blk, 0)
    if NESTED:
        q = tl.load(absmax_ptr + blk).to(tl.int32)
        return _gather_f32(ncode_ptr + q, INTERP) * _gather_f32(nabs_ptr + (blk >> 8), INTERP) + offset
    else:
        return _gather_f32(absmax_ptr + blk, INTERP)


@triton.jit
def _x_octets(x_ptr, j0, jlimit, NW: tl.constexpr, INTERP: tl.constexpr):
    """x for the packed words j = j0 + arange(NW) (word j = elements 8j .. 8j+7, byte q of it =
    elements 8j+2q, 8j+2q+1): 8 fp32 [NW] tensors x[8j], .., x[8j+7], 0 where j >= jlimit.
    On a GPU one predicated 16-byte load (two for fp32) per word in inline PTX: its layout
    follows the consumer (the W words), so x needs no layout conversion through shared memory
    (a tl.load would get a coalesced layout of its own).  The caller passes x 16-byte aligned."""
    T: tl.constexpr = x_ptr.dtype.element_ty
    j = j0 + tl.arange(0, NW)
    m = j < jlimit
    if INTERP:
        p = x_ptr + j * 8
        return (tl.load(p, mask=m, other=0.0).to(tl.float32), tl.load(p + 1, mask=m, other=0.0).to(tl.float32),
                tl.load(p + 2, mask=m, other=0.0).to(tl.float32), tl.load(p + 3, mask=m, other=0.0).to(tl.float32),
                tl.load(p + 4, mask=m, other=0.0).to(tl.float32), tl.load(p + 5, mask=m, other=0.0).to(tl.float32),
                tl.load(p + 6, mask=m, other=0.0).to(tl.float32), tl.load(p + 7, mask=m, other=0.0).to(tl.float32))
    else:
        if T == tl.float32:
            asm: tl.constexpr = """{
            .reg .pred %xo_p;
            setp.ne.b32 %xo_p, $9, 0;
            mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;
            mov.b32 $4, 0; mov.b32 $5, 0; mov.b32 $6, 0; mov.b32 $7, 0;
            @%xo_p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$8];
            @%xo_p ld.global.nc.v4.b32 {$4, $5, $6, $7}, [$8+16];
            }"""
        elif T == tl.bfloat16:
            asm: tl.constexpr = """{
            .reg .pred %xo_p;
            .reg .b32 %xo_u<4>;
            setp.ne.b32 %xo_p, $9, 0;
            mov.b32 %xo_u0, 0; mov.b32 %xo_u1, 0; mov.b32 %xo_u2, 0; mov.b32 %xo_u3, 0;
            @%xo_p ld.global.nc.v4.b32 {%xo_u0, %xo_u1, %xo_u2, %xo_u3}, [$8];
            shl.b32 $0, %xo_u0, 16; and.b32 $1, %xo_u0, 0xFFFF0000;
            shl.b32 $2, %xo_u1, 16; and.b32 $3, %xo_u1, 0xFFFF0000;
            shl.b32 $4, %xo_u2, 16; and.b32 $5, %xo_u2, 0xFFFF0000;
            shl.b32 $6, %xo_u3, 16; and.b32 $7, %xo_u3, 0xFFFF0000;
            }"""
        else:
            asm: tl.constexpr = """{
            .reg .pred %xo_p;
            .reg .b32 %xo_u<4>;
            .reg .f16 %xo_h<8>;
            setp.ne.b32 %xo_p, $9, 0;
            mov.b32 %xo_u0, 0; mov.b32 %xo_u1, 0; mov.b32 %xo_u2, 0; mov.b32 %xo_u3, 0;
            @%xo_p ld.global.nc.v4.b32 {%xo_u0, %xo_u1, %xo_u2, %xo_u3}, [$8];
            mov.b32 {%xo_h0, %xo_h1}, %xo_u0; mov.b32 {%xo_h2, %xo_h3}, %xo_u1;
            mov.b32 {%xo_h4, %xo_h5}, %xo_u2; mov.b32 {%xo_h6, %xo_h7}, %xo_u3;
            cvt.f32.f16 $0, %xo_h0; cvt.f32.f16 $1, %xo_h1; cvt.f32.f16 $2, %xo_h2; cvt.f32.f16 $3, %xo_h3;
            cvt.f32.f16 $4, %xo_h4; cvt.f32.f16 $5, %xo_h5; cvt.f32.f16 $6, %xo_h6; cvt.f32.f16 $7, %xo_h7;
            }"""
        return tl.inline_asm_elementwise(
            asm, "=r,=r,=r,=r,=r,=r,=r,=r,l,r", [(x_ptr + j * 8).to(tl.int64), m.to(tl.int32)],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)


@triton.jit
def _epilogue_row(acc, m, rn, nmask, bias_ptr, l_ptr, b_ptr, stride_lm, RANK, lora_scale, HAS_BIAS: tl.constexpr,
                  HAS_LORA: tl.constexpr, R_PAD: tl.constexpr):
    """acc [BLOCK_N] of output row m += s·L[m]·B[rn]ᵀ + bias[rn] (fp32 FMAs)."""
    if HAS_LORA:
        j = tl.arange(0, R_PAD)
        lt = tl.load(l_ptr + m * stride_lm + j, mask=j < RANK, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + rn.to(tl.int64)[:, None] * RANK + j[None, :], mask=nmask[:, None] & (j < RANK)[None, :],
                     other=0.0).to(tl.float32)
        acc += lora_scale * tl.sum(bt * lt[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, l_ptr, b_ptr, out_ptr, M, N, stride_om, stride_lm, RANK, lora_scale,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                          R_PAD: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr,
                          PDL: tl.constexpr = False):
    """out[m, n] = sum_s ws[s, m, n] (fixed order) + s·L[m]·B[n]ᵀ + bias[n], in out's dtype.
    PDL (launched with launch_pdl): wait for the kernel that wrote ws before reading it."""
    if PDL:
        gdc_wait()
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m).to(tl.int64) * N + rn, mask=nmask, other=0.0)
    acc = _epilogue_row(acc, m, rn, nmask, bias_ptr, l_ptr, b_ptr, stride_lm, RANK, lora_scale, HAS_BIAS, HAS_LORA,
                        R_PAD)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rn, _round_to(acc, out_ptr.dtype.element_ty, INTERP),
             mask=nmask)


# ----------------------------------------------------------------------------- configs
def _cfg(**kw) -> triton.Config:
    warps = kw.pop("warps")
    stages = kw.pop("stages")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def fused_configs(cap: tuple[int, int], large: bool) -> list[triton.Config]:
    """Tile configs of the fused kernel for M in (16, DEQUANT_GEMM_MIN_M) ('medium') or above
    ('large'), by architecture.  First entry = the untuned default."""
    if INTERPRET:
        return [_cfg(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=2, warps=4, stages=1)]
    if cap[0] >= 9:  # H100: 228 KB smem; packed W stages are 1/4 the size of a bf16 tile
        if large:
            return [_cfg(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=8, stages=4),
                    _cfg(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=128, GROUP_M=8, warps=8, stages=3)]
        return [_cfg(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=4, stages=4),
                _cfg(BLOCK_M=32, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=4, stages=4),
                _cfg(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=128, GROUP_M=8, warps=4, stages=4),
                _cfg(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=8, stages=3)]
    # sm80 / sm86 / sm89 (A100: 164 KB smem) and anything older; not timed on such a card.
    if large:
        # The 128x128 tile on 8 warps: on 4 warps its fp32 accumulator alone is 128 registers
        # per thread and the kernel sits at 255 (the backward spilled 8 B on Triton 3.6);
        # on 8 warps 152-158 registers on Triton 3.6 and 3.9, sm_80 and sm_86, same smem.
        return [_cfg(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=32, GROUP_M=8, warps=8, stages=4),
                _cfg(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=8, stages=3)]
    return [_cfg(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=4, stages=3),
            _cfg(BLOCK_M=32, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, warps=4, stages=4),
            _cfg(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=64, GROUP_M=8, warps=4, stages=4)]


def gemv_configs(cap: tuple[int, int], m_one: bool) -> list[triton.Config]:
    """Decode configs: M == 1 (FMA reduction, BLOCK_M = 1) or 2..16 (tl.dot, BLOCK_M = 16)."""
    if INTERPRET:
        if m_one:
            return [_cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, warps=4, stages=1)]
        return [_cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, warps=4, stages=1)]
    if m_one:
        # Word path (K % 32 == 0).  H100, 4096x14336 bf16, device time (gpu_sweep, 2026-11-26):
        # cfg 0 24.9 us, cfg 1 27.5, cfg 2 26.3, cfg 3 25.9 (before the word path: 35.7 us);
        # 11 other shapes of block swept, none below 24.5 us.  Static: cfg 0 8.7 SASS
        # instructions per weight byte, 96 registers, no shared memory in the loop.
        return [_cfg(BLOCK_M=1, BLOCK_N=8, BLOCK_K=2048, SPLIT_K=1, warps=4, stages=2),
                _cfg(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, SPLIT_K=1, warps=4, stages=2),
                _cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=1024, SPLIT_K=2, warps=4, stages=2),
                _cfg(BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, SPLIT_K=1, warps=4, stages=2)]
    return [_cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, warps=4, stages=3),
            _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=2, warps=4, stages=3),
            _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, warps=4, stages=4),
            _cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, SPLIT_K=4, warps=4, stages=3)]


def max_split_k() -> int:
    return max(c.kwargs["SPLIT_K"] for m_one in (True, False) for c in gemv_configs((9, 0), m_one))


_TUNED: dict = {}
_FORCED: dict = {}


class force_config:
    """Launch kernel `kind` ("fused" or "gemv") with this triton.Config instead of autotuning
    (benchmarks time each config this way).  `with force_config("gemv", cfg): ...`"""

    def __init__(self, kind: str, cfg: triton.Config) -> None:
        self.kind, self.cfg = kind, cfg

    def __enter__(self) -> "force_config":
        _FORCED[self.kind] = self.cfg
        return self

    def __exit__(self, *exc) -> None:
        _FORCED.pop(self.kind, None)


def _launcher(kind: str, cap: tuple[int, int], variant: bool):
    """(kernel to launch, configs): an autotuned kernel on a GPU (keyed by M bucket and the
    weight shape), or the raw kernel + first config under the interpreter / AUTOTUNE off."""
    if kind in _FORCED:
        return (_fused_matmul_kernel if kind == "fused" else _gemv_kernel), _FORCED[kind]
    key = (kind, cap, variant, AUTOTUNE and not INTERPRET)
    if key not in _TUNED:
        fn = _fused_matmul_kernel if kind == "fused" else _gemv_kernel
        cfgs = fused_configs(cap, variant) if kind == "fused" else gemv_configs(cap, variant)
        if INTERPRET or not AUTOTUNE or len(cfgs) == 1:
            _TUNED[key] = (fn, cfgs[0])
        else:
            keys = ["M_BUCKET", "P", "Q", "FWD"] if kind == "fused" else ["M_BUCKET", "N", "K"]
            _TUNED[key] = (triton.autotune(configs=cfgs, key=keys)(fn), None)
    return _TUNED[key]


def _launch(kernel, cfg: Optional[triton.Config], grid, args: tuple, consts: dict):
    if cfg is None:
        kernel[grid](*args, **consts)
    else:
        kernel[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def m_bucket(M: int) -> int:
    """Autotune key for M: next power of two, capped at 8192."""
    return min(next_pow2(M), 8192)


# ----------------------------------------------------------------------------- helpers
def _state(packed, absmax, nested_absmax, nested_code, offset, quant_type, device):
    table, _, _ = device_constants(quant_type, device)
    nested = nested_absmax is not None
    absmax = absmax.contiguous()
    return (packed.reshape(-1).contiguous(), absmax, nested_absmax.contiguous() if nested else absmax,
            nested_code.float().contiguous() if nested else table,
            offset.reshape(1).float().contiguous() if nested else table, table), nested


def _supported(x: torch.Tensor, lora_A: Optional[torch.Tensor]) -> bool:
    if x.dtype not in _FLOAT_DTYPES or x.dim() != 2:
        return False
    return lora_A is None or lora_A.shape[0] <= MAX_LORA_RANK


def _w_args(K: int) -> tuple[int, int]:
    """(bytes per row of W when rows are byte aligned, K_ALIGN)."""
    ka = k_align(K)
    return (K // 2 if ka >= 2 else 0), ka


# ----------------------------------------------------------------------------- forward
def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, quant_type: str,
                N: int, K: int, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                lora_B: Optional[torch.Tensor], lora_scale: float):
    """x [M, K] (fp32/fp16/bf16) -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype.

    W [N, K] packed uint8 [(N*K+1)//2], A [r, K], B [N, r].  NotImplemented (-> next backend)
    for a non-2-D x, another dtype, or r > MAX_LORA_RANK.
    """
    if not _supported(x, lora_A):
        return NotImplemented
    T = x.dtype
    M = x.shape[0]
    dev = x.device
    out = torch.empty((M, N), dtype=T, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return reference_tail(out, x, bias, lora_A, lora_B, lora_scale)
    x = x if x.stride(-1) == 1 else x.contiguous()
    bias_t = bias.to(T).contiguous() if bias is not None else None
    if lora_A is not None:
        A_t = lora_A.to(T)
        B_t = lora_B.to(T).contiguous()
        L = (x @ A_t.t()).contiguous()      # [M, r]: the small down-projection, one GEMM
    else:
        B_t = L = None
    if dev.type == "cuda" and DEQUANT_GEMM_MIN_M and M >= DEQUANT_GEMM_MIN_M:
        W = quant.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K,
                                  T).view(N, K)
        out = torch.addmm(bias_t, x, W.t()) if bias_t is not None else torch.mm(x, W.t())
        if L is not None:
            out.addmm_(L, B_t.t(), alpha=lora_scale)   # LoRA folded into a beta=1 GEMM
        return out
    st, nested = _state(packed, absmax, nested_absmax, nested_code, offset, quant_type, dev)
    stride_wb, ka = _w_args(K)
    r = lora_A.shape[0] if lora_A is not None else 0
    dummy = st[5]
    common = dict(BS=blocksize, NESTED=nested, K_ALIGN=ka, HAS_BIAS=bias is not None, HAS_LORA=L is not None,
                  R_PAD=max(16, next_pow2(r)), INTERP=INTERPRET, IEEE=T == torch.float32)
    cap = capability(dev)
    stream = M == 1 and GEMV_STREAM and K % STREAM_CONFIG["BLOCK_K"] == 0
    if stream or (M == 1 and M <= GEMV_MAX_M):
        # the word and stream paths read x in 16-byte vectors and W as 32-bit words (M = 1: a tiny copy)
        if x.data_ptr() % 16:
            x = x.clone()
        if st[0].data_ptr() % 4:
            st = (st[0].clone(), *st[1:])
    if stream:
        return _gemv_stream(x, st, nested, blocksize, N, K, stride_wb, bias_t, L, B_t, r, lora_scale, common, out)
    if M <= GEMV_MAX_M:
        kernel, cfg = _launcher("gemv", cap, M == 1)

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        # fp32 partials for the split-K configs (every config writes all it uses: no zeroing)
        splits = max(max_split_k(), cfg.kwargs["SPLIT_K"] if cfg is not None else 1)  # a forced config's too
        ws = torch.empty((splits, M, N), dtype=torch.float32, device=dev)
        args = (x, *st[:6], bias_t if bias_t is not None else dummy, L if L is not None else dummy,
                B_t if B_t is not None else dummy, out, ws, M, N, K, stride_wb, x.stride(0), out.stride(0),
                L.stride(0) if L is not None else 0, r, float(lora_scale), m_bucket(M))
        _launch(kernel, cfg, grid, args, common)
        split = cfg.kwargs["SPLIT_K"] if cfg is not None else kernel.best_config.kwargs["SPLIT_K"]
        if split > 1:
            _splitk_reduce(ws, split, bias_t, L, B_t, r, lora_scale, common["R_PAD"], dummy, out)
        return out
    kernel, cfg = _launcher("fused", cap, M > 256)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_P"]),)

    args = (x, *st[:6], bias_t if bias_t is not None else dummy, L if L is not None else dummy,
            B_t if B_t is not None else dummy, out, M, N, K, N, K, stride_wb, x.stride(0), out.stride(0),
            L.stride(0) if L is not None else 0, 1, r, r, float(lora_scale), m_bucket(M))
    _launch(kernel, cfg, grid, args, dict(common, FWD=True))
    return out


def _stream_programs(N: int, K: int, device: torch.device) -> int:
    """The stream kernel's persistent grid: programs_per_sm on every SM (num_sms: 4 under the
    interpreter, so that the tests see several passes), in whole rows of K-tiles, no more than
    there are tiles."""
    tpr = K // STREAM_CONFIG["BLOCK_K"]
    tiles = triton.cdiv(N, STREAM_CONFIG["BLOCK_N"]) * tpr
    progs = min(tiles, num_sms(device) * STREAM_CONFIG["programs_per_sm"])
    return max(tpr, progs - progs % tpr)


def _splitk_reduce(ws, split, bias_t, L, B_t, r, lora_scale, r_pad, dummy, out, pdl: bool = False) -> None:
    """out [M, N] = the `split` fp32 partial slices of ws [split, M, N] summed in order, + s·L·Bᵀ
    + bias, in out's dtype (_splitk_reduce_kernel); absent operands as None (dummy is passed).
    pdl: a programmatic dependent launch (the kernel before it signals; sm_90+, not interpreted)."""
    M, N = out.shape
    bn = 128
    launch = dict(PDL=True, launch_pdl=True) if pdl else {}
    _splitk_reduce_kernel[(M, triton.cdiv(N, bn))](
        ws, bias_t if bias_t is not None else dummy, L if L is not None else dummy, B_t if B_t is not None else dummy,
        out, M, N, out.stride(0), L.stride(0) if L is not None else 0, r, float(lora_scale), SPLIT_K=split,
        HAS_BIAS=bias_t is not None, HAS_LORA=L is not None, R_PAD=r_pad, INTERP=INTERPRET, BLOCK_N=bn,
        num_warps=4, **launch)


def _stream_pdl(device: torch.device) -> bool:
    """Whether the stream path launches its reduction with programmatic dependent launch: STREAM_PDL,
    on a GPU of compute capability 9.0+ (griddepcontrol), never under the interpreter."""
    return STREAM_PDL and _HAS_GDC and not INTERPRET and capability(device)[0] >= 9


def _gemv_stream(x, st, nested, blocksize, N, K, stride_wb, bias_t, L, B_t, r, lora_scale, common, out):
    """M = 1 through _gemv_stream_kernel (fp32 partials per K-tile) and _splitk_reduce_kernel (their
    sum in order, bias, LoRA, the cast to out's dtype)."""
    cfg = STREAM_CONFIG
    tpr = K // cfg["BLOCK_K"]
    progs = _stream_programs(N, K, x.device)
    ws = torch.empty((tpr, 1, N), dtype=torch.float32, device=x.device)
    pdl = _stream_pdl(x.device)
    _gemv_stream_kernel[(progs,)](x, *st[:6], ws, N, K, stride_wb, progs // tpr, BS=blocksize, NESTED=nested,
                                  INTERP=INTERPRET, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                  num_warps=cfg["warps"], num_stages=1, **(dict(PDL=True) if pdl else {}))
    _splitk_reduce(ws, tpr, bias_t, L, B_t, r, lora_scale, common["R_PAD"], st[5], out, pdl=pdl)
    return out


def reference_tail(out, x, bias, lora_A, lora_B, lora_scale):
    """K == 0: the product is empty; only bias (LoRA of an empty input is 0)."""
    out.zero_()
    if bias is not None:
        out += bias.to(out.dtype)
    return out


# ----------------------------------------------------------------------------- backward
def matmul_4bit_backward_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                               nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                               offset: Optional[torch.Tensor], blocksize: int, quant_type: str, N: int, K: int,
                               lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], lora_scale: float):
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype.  The packed W [N, K] is read
    in row order as the [reduction, output] operand: no transposed copy of W is made."""
    if not _supported(dy, lora_A):
        return NotImplemented
    T = dy.dtype
    M = dy.shape[0]
    dev = dy.device
    out = torch.empty((M, K), dtype=T, device=dev)
    if M == 0 or K == 0:
        return out
    if N == 0:
        return out.zero_()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if lora_A is not None:
        A_t = lora_A.to(T).contiguous()
        L = (dy @ lora_B.to(T)).contiguous()      # [M, r]
    else:
        A_t = L = None
    if dev.type == "cuda" and ((DEQUANT_GEMM_MIN_M and M >= DEQUANT_GEMM_MIN_M) or not FUSED_BACKWARD):
        W = quant.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K,
                                  T).view(N, K)
        out = torch.mm(dy, W)
        if L is not None:
            out.addmm_(L, A_t, alpha=lora_scale)
        return out
    st, nested = _state(packed, absmax, nested_absmax, nested_code, offset, quant_type, dev)
    stride_wb, ka = _w_args(K)
    r = lora_A.shape[0] if lora_A is not None else 0
    dummy = st[5]
    consts = dict(BS=blocksize, NESTED=nested, K_ALIGN=ka, FWD=False, HAS_BIAS=False, HAS_LORA=L is not None,
                  R_PAD=max(16, next_pow2(r)), INTERP=INTERPRET, IEEE=T == torch.float32)
    kernel, cfg = _launcher("fused", capability(dev), M > 256)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_P"]),)

    args = (dy, *st[:6], dummy, L if L is not None else dummy, A_t if A_t is not None else dummy, out,
            M, K, N, N, K, stride_wb, dy.stride(0), out.stride(0), L.stride(0) if L is not None else 0, K, 1, r,
            float(lora_scale), m_bucket(M))
    _launch(kernel, cfg, grid, args, consts)
    return out
