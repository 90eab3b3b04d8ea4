"""Run every GPU kernel of nf4kit once, on small odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python -m benchmarks.gpu_sanitize [--backends cuda,triton]

Shapes have tails everywhere (numel odd, K not a multiple of the blocksize, blocks crossing
rows, M not a multiple of any tile), so an out-of-bounds access shows.  Each result is compared
with the torch backend as well (a sanity check, printed), and which backend really served each
call is printed: a fallback is not a sanitized kernel.  Exit status: 0 when every call ran on
the backend asked for and agreed; 1 otherwise (compute-sanitizer's own errors use its
--error-exitcode).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ._settings import PLAIN_MMA, settings


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    d = b.norm().item()
    return (a - b).norm().item() / (d if d > 0 else 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default=None, help="default: cuda and triton where available")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device")
        return 2
    import nf4kit
    from nf4kit import backends as B
    from nf4kit import ops
    from nf4kit.format import packed_as_bytes

    avail = B.available_backends()
    want = args.backends.split(",") if args.backends else [b for b in ("cuda", "triton") if b in avail]
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(7)

    def rn(*s, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dev, dtype)

    N, K, r = 300, 520, 16  # numel odd? 300*520 even; the odd case is below
    W = rn(N, K, scale=0.05)
    A, Bm = rn(r, K, scale=0.05), rn(N, r, scale=0.05)
    bias = rn(N)
    odd = rn(1001, dtype=torch.float32)
    failures: list[str] = []
    print(f"backends available {avail}; sanitizing {want}")

    for b in want:
        calls: list[tuple[str, str, object, object]] = []  # (what, op, fn, ref_fn)

        def q4(x, nested, qt="nf4"):
            return nf4kit.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type=qt)

        # quantize (nf4 + fp4, odd numel, nested) and dequantize (nested, plain, each dtype)
        for qt in ("nf4", "fp4"):
            calls.append((f"quantize_4bit {qt} odd", "quantize_4bit",
                          lambda qt=qt: nf4kit.dequantize_4bit(*q4(odd, True, qt)), None))
        pk_n, qs_n = q4(W, True)
        pk_p, qs_p = q4(W, False)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            calls.append((f"dequantize_4bit nested {dt}", "dequantize_4bit",
                          lambda dt=dt: nf4kit.dequantize_4bit(pk_n, qs_n, dtype=dt), "same"))
        calls.append(("dequantize_4bit plain", "dequantize_4bit", lambda: nf4kit.dequantize_4bit(pk_p, qs_p), "same"))
        calls.append(("quantize_blockwise", "quantize_blockwise",
                      lambda: nf4kit.dequantize_blockwise(*nf4kit.quantize_blockwise(odd)), "same"))
        # gemv / small M, fused forward (+LoRA +bias) at medium M, backward dX
        for M in (1, 3, 16, 77):
            x = rn(M, K)
            calls.append((f"matmul_4bit M={M}", "matmul_4bit",
                          lambda x=x: nf4kit.matmul_4bit(x, pk_n, qs_n), "same"))
            calls.append((f"matmul_4bit+lora+bias M={M}", "matmul_4bit",
                          lambda x=x: nf4kit.matmul_4bit(x, pk_n, qs_n, bias=bias, lora_A=A, lora_B=Bm,
                                                         lora_scale=2.0), "same"))
            dy = rn(M, N)
            calls.append((f"backward_input+lora M={M}", "matmul_4bit_backward_input",
                          lambda dy=dy: ops.matmul_4bit_backward_input(
                              dy, packed_as_bytes(pk_n), *ops.state_args(qs_n), 64, "nf4", N, K, A, Bm, 2.0), "same"))
        xf = rn(5, K, dtype=torch.float32)
        calls.append(("matmul_4bit fp32 M=5", "matmul_4bit", lambda: nf4kit.matmul_4bit(xf, pk_p, qs_p), "same"))
        if b == "cuda":  # the stream GEMVs: rings past the last row, the tensor-core table
            from nf4kit.backends import cuda as cb

            pk_s, qs_s = q4(rn(37, 2048, scale=0.05), True)
            x_s = rn(1, 2048)

            def stream_gemv(**values):
                with settings(cb, **values):
                    return nf4kit.matmul_4bit(x_s, pk_s, qs_s, bias=bias[:37])

            stream = dict(GEMV_MMA=False, GEMV_STREAM=True)
            for label, values in (("stream d4", dict(stream, GEMV_STREAM_DEPTH=4)),
                                  ("stream d8", dict(stream, GEMV_STREAM_DEPTH=8)),
                                  ("mma d2", dict(PLAIN_MMA, GEMV_MMA_DEPTH=2)),
                                  ("mma d3", dict(PLAIN_MMA, GEMV_MMA_DEPTH=3)),
                                  ("mma block reduce", dict(PLAIN_MMA, GEMV_MMA_BLOCK_REDUCE=True)),
                                  ("mma compact block reduce", dict(PLAIN_MMA, GEMV_MMA_BLOCK_REDUCE=True,
                                                                    GEMV_MMA_COMPACT=True)),
                                  ("mma pdl finalize", dict(PLAIN_MMA, GEMV_PDL=True))):
                calls.append((f"matmul_4bit {label}", "matmul_4bit", lambda v=values: stream_gemv(**v), "same"))
            # The compact M = 1 kernel with 2 row parts (20 tiles: W = 10), slices for the finalize.
            pk_c, qs_c = q4(rn(37, 5120, scale=0.05), False)
            x_c1 = rn(1, 5120)

            def compact_parts():
                with settings(cb, GEMV_MMA=True, GEMV_MMA_BLOCK_REDUCE=True, GEMV_MMA_COMPACT=True):
                    return nf4kit.matmul_4bit(x_c1, pk_c, qs_c, bias=bias[:37])

            calls.append(("matmul_4bit mma compact block reduce, 2 parts", "matmul_4bit", compact_parts, "same"))
            # The tensor-core batch kernel: one n-tile (M <= 8) and two (M <= 16).
            for m_rows in (3, 13):
                x_b = rn(m_rows, 2048)

                def batch_gemv(x_b=x_b):
                    with settings(cb, GEMV_MMA=True):
                        return nf4kit.matmul_4bit(x_b, pk_s, qs_s, bias=bias[:37])

                calls.append((f"matmul_4bit mma batch M={m_rows}", "matmul_4bit", batch_gemv, "same"))
            # The table GEMM (the M = 17..64 default on sm_90): M = 33 in the heuristic's splits, M = 64
            # in one (y written); and the fused GEMM it replaced there (still A100's, and the backward's).
            # Compact (the default at M <= 32 on sm_90): two 8-warp blocks an SM (M <= 32) and one of 16
            # warps (M = 33..64).
            for m_rows, splits, compact in ((33, None, False), (64, 1, False), (17, 2, True), (32, 1, True),
                                            (33, 2, True), (64, 1, True)):
                x_g = rn(m_rows, 2048)

                def table_gemm(x_g=x_g, splits=splits, compact=compact):
                    with settings(cb, GEMV_MMA_GEMM=True, GEMM_MMA_SPLITS=splits, GEMV_MMA_GEMM_COMPACT=compact):
                        return nf4kit.matmul_4bit(x_g, pk_s, qs_s, bias=bias[:37])

                calls.append((f"matmul_4bit table GEMM{' compact' if compact else ''} M={m_rows}", "matmul_4bit",
                              table_gemm, "same"))
            # Its splits summed in a thread-block cluster (GEMV_MMA_GEMM_CLUSTER, sm_90+): remote
            # shared-memory reads, bias in the kernel, no finalize.
            if torch.cuda.get_device_capability()[0] >= 9:
                for m_rows, splits, compact in ((33, 3, False), (17, 2, True), (64, 8, True)):
                    x_c = rn(m_rows, 2048)

                    def cluster_gemm(x_c=x_c, splits=splits, compact=compact):
                        with settings(cb, GEMV_MMA_GEMM=True, GEMM_MMA_SPLITS=splits, GEMV_MMA_GEMM_COMPACT=compact,
                                      GEMV_MMA_GEMM_CLUSTER=True):
                            return nf4kit.matmul_4bit(x_c, pk_s, qs_s, bias=bias[:37])

                    calls.append((f"matmul_4bit table GEMM{' compact' if compact else ''} cluster sums M={m_rows} "
                                  f"S={splits}", "matmul_4bit", cluster_gemm, "same"))
            x_f = rn(33, 2048)

            def fused_gemm():
                with settings(cb, GEMV_MMA_GEMM=False):
                    return nf4kit.matmul_4bit(x_f, pk_s, qs_s, bias=bias[:37])

            calls.append(("matmul_4bit fused GEMM M=33", "matmul_4bit", fused_gemm, "same"))

        for what, op, fn, ref in calls:
            B.last_backend.pop(op, None)
            try:
                with nf4kit.use_backend(b):
                    out = fn()
                torch.cuda.synchronize()
            except Exception as e:
                failures.append(f"{b}: {what}: {type(e).__name__}: {e}")
                print(f"  [{b}] {what:<36} ERROR {type(e).__name__}: {e}")
                continue
            ran = B.last_backend.get(op)
            err = None
            if ref == "same":
                with nf4kit.use_backend("torch"):
                    expect = fn()
                err = rel(out, expect)
            # dequantize is bit-exact on every backend; matmuls agree to rounding
            tol = 1e-30 if "dequantize" in what else 2e-2 if out.dtype in (torch.bfloat16, torch.float16) else 1e-4
            ok = ran == b and (err is None or err < tol or (tol == 1e-30 and err == 0.0))
            if not ok:
                failures.append(f"{b}: {what}: ran on {ran}, rel err {err}")
            print(f"  [{b}] {what:<36} ran on {ran:<7} rel err {'-' if err is None else f'{err:.1e}'}"
                  f"{'' if ok else '   <-- FAIL'}")
    print(f"gpu_sanitize: {len(failures)} problem(s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
