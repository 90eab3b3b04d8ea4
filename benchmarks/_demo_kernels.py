"""Small Triton kernels that exercise the kernel report and its invariants.

Each invariant of benchmarks.kernel_report must be shown to FAIL when it should (issue 6): this
module holds, for each rule, a kernel that keeps it and a deliberately broken twin, in the
registry format the report reads (see benchmarks/kernel_report.py, "Registry format").  They
are not nf4kit's kernels and are never launched; tests/test_kernel_report.py compiles them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def demo_dequant_nested(packed_ptr, qabs_ptr, nested_ptr, dyn_ptr, offset_ptr, table_ptr, out_ptr, n_bytes,
                        BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """NF4 dequantize with the nested absmax decode: 16-byte loads of packed codes, the
    absmax as dyn[q]·nested + offset (a multiply then an add: an FMA would change bits)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)
    blk = (offs * 2) // BLOCKSIZE
    q = tl.load(qabs_ptr + blk, mask=mask, other=0)
    amax = tl.load(dyn_ptr + q.to(tl.int32)) * tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)
    amax = amax + tl.load(offset_ptr)
    hi = tl.load(table_ptr + (byte >> 4).to(tl.int32)) * amax
    lo = tl.load(table_ptr + (byte & 15).to(tl.int32)) * amax
    vals = tl.interleave(hi, lo).to(tl.bfloat16)
    o = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + o, vals, mask=o < 2 * n_bytes)


@triton.jit
def demo_dequant_bytewise(packed_ptr, absmax_ptr, table_ptr, out_ptr, n, BLOCK: tl.constexpr,
                          BLOCKSIZE: tl.constexpr):
    """The same decode one output element at a time: each lane gathers its byte (offs // 2),
    so the loads cannot be 16 bytes wide.  The broken twin of the 128-bit rule."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
    v = tl.load(table_ptr + code) * tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offs, v.to(tl.bfloat16), mask=mask)


@triton.jit
def demo_gemm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              USE_DOT: tl.constexpr):
    """C = A·B, bf16 in, fp32 accumulate.  USE_DOT=False multiplies by broadcast-and-sum: no
    tensor-core instruction (the broken twin of the tensor-core rule)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        if USE_DOT:
            acc += tl.dot(a, b)
        else:
            acc += tl.sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), axis=1)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


_DEQ_SIG = {"packed_ptr": "*u8", "qabs_ptr": "*u8", "nested_ptr": "*fp32", "dyn_ptr": "*fp32",
            "offset_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": "*bf16", "n_bytes": "i32"}
_GEMM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
_ALL_INTS = ("n_bytes", "n", "M", "N", "K")

# Registry entries (the format of triton_kernels/registry.py).
GOOD = [
    dict(name="demo_dequant_nested", fn=demo_dequant_nested, signature=_DEQ_SIG, role="dequantize", bit_exact=True,
         constexprs={"BLOCK": 2048, "BLOCKSIZE": 64}, configs=[{"num_warps": 4}], divisible_by_16=_ALL_INTS),
    dict(name="demo_gemm", fn=demo_gemm, signature=_GEMM_SIG, role="gemm",
         constexprs={"BM": 64, "BN": 64, "BK": 32, "USE_DOT": True}, configs=[{"num_warps": 4, "num_stages": 2}],
         divisible_by_16=_ALL_INTS),
]
BROKEN = [
    # FMA contraction left on in a bit-exact kernel: amax = dyn[q]*nested + offset becomes fma.rn
    dict(name="broken_fp_fusion", fn=demo_dequant_nested, signature=_DEQ_SIG, role="dequantize", bit_exact=True,
         constexprs={"BLOCK": 2048, "BLOCKSIZE": 64}, configs=[{"num_warps": 4}], divisible_by_16=_ALL_INTS,
         options={"enable_fp_fusion": True}, expect_violation="fma"),
    # byte-wise gathers: no 128-bit global load
    dict(name="broken_bytewise_dequant", fn=demo_dequant_bytewise,
         signature={"packed_ptr": "*u8", "absmax_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32"},
         role="dequantize", bit_exact=True, constexprs={"BLOCK": 1024, "BLOCKSIZE": 64},
         configs=[{"num_warps": 4}], divisible_by_16=_ALL_INTS, expect_violation="ldg128"),
    # no tl.dot: no tensor-core instruction in a GEMM
    dict(name="broken_gemm_no_tensor_cores", fn=demo_gemm, signature=_GEMM_SIG, role="gemm",
         constexprs={"BM": 32, "BN": 32, "BK": 8, "USE_DOT": False}, configs=[{"num_warps": 4, "num_stages": 1}],
         divisible_by_16=_ALL_INTS, expect_violation="tensor_cores"),
    # a 128×128 fp32 accumulator in 4 warps squeezed into 64 registers: spills to local memory
    # (sm_80 only: ptxas refuses wgmma under such a cap)
    dict(name="broken_gemm_spills", fn=demo_gemm, signature=_GEMM_SIG, role="gemm", archs=(80,),
         constexprs={"BM": 128, "BN": 128, "BK": 32, "USE_DOT": True},
         configs=[{"num_warps": 4, "num_stages": 2, "maxnreg": 64}], divisible_by_16=_ALL_INTS,
         expect_violation="spills"),
]
KERNELS = GOOD + BROKEN
