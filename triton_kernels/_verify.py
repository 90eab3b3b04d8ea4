"""GPU acceptance check of the triton backend through the public API, on shapes and seeds the
tests do not use: quantize / dequantize bit-exact against reference.py on the CPU, matmul
forward and dx (default regimes and the Triton kernels forced) by relative error against
float64.  `python -m nf4kit.triton_kernels._verify`; prints one line per case, exits 1 on a
mismatch."""
from __future__ import annotations

import sys

import torch

import nf4kit
from nf4kit import backends, ops
from nf4kit import format as fmt
from nf4kit import reference as ref
from nf4kit.triton_kernels import matmul as MM


def main() -> int:
    dev = "cuda"
    bad = 0
    g = torch.Generator().manual_seed(1234)
    with nf4kit.use_backend("triton"):
        for (shape, bs, qt, dt) in [((1024, 4096), 64, "nf4", torch.bfloat16), ((777, 1001), 128, "fp4", torch.float16),
                                    ((4097, 33), 4096, "nf4", torch.float32), ((3, 5, 7), 32, "fp4", torch.bfloat16)]:
            A = (torch.randn(shape, generator=g) * 2).to(dt)
            packed, qs = nf4kit.quantize_4bit(A.to(dev), blocksize=bs, compress_statistics=True, quant_type=qt)
            wp, wa = ref.quantize_4bit(A, bs, qt)
            q, nest, off = ref.double_quantize(wa)
            ok = (torch.equal(packed.reshape(-1).cpu(), wp) and torch.equal(qs.absmax.cpu(), q)
                  and torch.equal(qs.state2.absmax.cpu(), nest) and torch.equal(qs.offset.cpu(), off))
            for odt in (torch.float32, torch.float16, torch.bfloat16):
                out = nf4kit.dequantize_4bit(packed, qs, dtype=odt)
                ok &= backends.last_backend["dequantize_4bit"] == "triton"
                ok &= torch.equal(out.reshape(-1).cpu(), ref.dequantize_4bit(wp, q, nest, fmt.dynamic_map(), off, bs, qt,
                                                                             A.numel(), odt))
            print(f"quant/dequant {shape} bs={bs} {qt} {dt}: {'OK' if ok else 'MISMATCH'}", flush=True)
            bad += not ok
        for (M, N, K, dt) in [(1, 1536, 2048, torch.bfloat16), (1, 999, 1000, torch.float16), (7, 513, 640, torch.bfloat16),
                              (100, 384, 1024, torch.float32), (300, 640, 768, torch.bfloat16), (1, 257, 321, torch.float32)]:
            W = torch.randn(N, K, generator=g)
            packed, qs = nf4kit.quantize_4bit(W.to(dev), blocksize=64)
            Wq = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double().cpu()
            x = torch.randn(M, K, generator=g).to(dt)
            A = (torch.randn(16, K, generator=g) * 0.05).to(dt)
            B = (torch.randn(N, 16, generator=g) * 0.05).to(dt)
            b = torch.randn(N, generator=g).to(dt)
            dy = torch.randn(M, N, generator=g).to(dt)
            want = x.double() @ Wq.t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t() + b.double()
            wdx = dy.double() @ Wq + 0.5 * (dy.double() @ B.double()) @ A.double()
            tol = 1e-5 if dt == torch.float32 else 1e-2
            for regime in ("default", "kernels"):
                saved = (MM.GEMV_MAX_M, MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD)
                if regime == "kernels":
                    MM.GEMV_MAX_M, MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD = 16, 0, True
                try:
                    pk = fmt.packed_as_bytes(packed)
                    y = ops.matmul_4bit(x.to(dev), pk, *ops.state_args(qs), 64, "nf4", N, K, b.to(dev), A.to(dev),
                                        B.to(dev), 0.5)
                    dx = ops.matmul_4bit_backward_input(dy.to(dev), pk, *ops.state_args(qs), 64, "nf4", N, K, A.to(dev),
                                                        B.to(dev), 0.5)
                finally:
                    MM.GEMV_MAX_M, MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD = saved
                e1 = float((y.double().cpu() - want).norm() / want.norm())
                e2 = float((dx.double().cpu() - wdx).norm() / wdx.norm())
                ok = e1 < tol and e2 < tol and backends.last_backend["matmul_4bit"] == "triton"
                print(f"matmul {regime} M={M} N={N} K={K} {dt}: fwd {e1:.2e} dx {e2:.2e} {'OK' if ok else 'FAIL'}",
                      flush=True)
                bad += not ok
    print("VERIFY", "OK" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
