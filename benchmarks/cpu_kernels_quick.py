"""Quick timings of the `cpu` backend's C++ kernels (a measurement script, not a test).

    python benchmarks/cpu_kernels_quick.py [--only dequant,quant,gemv,gemm,bwd,int8] [--reps 7]

Prints, for Llama-shaped weights: time (median), GB/s moved, the fraction of the copy
bandwidth measured in the same run (torch clone of a 256 MiB tensor: read + write, fresh
output each call, like a dequantize), the ratio to bitsandbytes' CPU path when it is
installed, and for matmuls the ratio to torch's F.linear on the dense weight.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import nf4kit
from nf4kit import backends, ops


def bench(fn, reps: int) -> float:
    """Median seconds of `reps` calls after two warm-ups."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(reps: int) -> tuple[float, float]:
    """(clone GB/s, copy_ into an existing buffer GB/s), bytes read + written."""
    big = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    out = torch.empty_like(big)
    nbytes = 2 * big.numel() * 4
    return nbytes / bench(big.clone, reps) / 1e9, nbytes / bench(lambda: out.copy_(big), reps) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="dequant,quant,gemv,gemm,bwd,int8")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    only = set(args.only.split(","))
    reps = args.reps
    torch.manual_seed(0)
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - optional anchor
        bnbf = None
    from nf4kit.backends import cpu as cpu_backend

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, nf4kit cpu isa {cpu_backend.isa()}")
    clone_bw, copy_bw = copy_bandwidth(reps)
    print(f"copy bandwidth: clone {clone_bw:.2f} GB/s (fresh output), copy_ {copy_bw:.2f} GB/s (existing output)")

    if "dequant" in only:
        N, K = 4096, 14336
        W = torch.randn(N, K, dtype=torch.bfloat16)
        n = W.numel()
        for nested in (True, False):
            packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=nested)
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                with nf4kit.use_backend("cpu"):
                    t = bench(lambda: nf4kit.dequantize_4bit(packed, qs, dtype=dt), reps)
                    assert backends.last_backend["dequantize_4bit"] == "cpu"
                es = torch.empty((), dtype=dt).element_size()
                nbytes = n / 2 + n * es + (n / 64 if nested else n / 16)
                gbs = nbytes / t / 1e9
                line = (f"dequantize_4bit {N}x{K} nested={nested!s:5} -> {str(dt)[6:]:8}: {t * 1e3:7.2f} ms "
                        f"{gbs:6.2f} GB/s  {gbs / clone_bw:5.2f}x clone  {gbs / copy_bw:5.2f}x copy_")
                if bnbf is not None and dt == torch.bfloat16:
                    bp, bqs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4")
                    tb = bench(lambda: bnbf.dequantize_4bit(bp, bqs), reps)
                    line += f"  bnb {tb * 1e3:7.2f} ms -> {tb / t:5.2f}x faster"
                print(line)

    if "quant" in only:
        N, K = 4096, 14336
        for dt in (torch.bfloat16, torch.float32):
            W = torch.randn(N, K, dtype=dt)
            with nf4kit.use_backend("cpu"):
                t = bench(lambda: nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True), reps)
                tk = bench(lambda: ops.quantize_4bit(W, 64, "nf4"), reps)
            nbytes = W.numel() * W.element_size() + W.numel() / 2 + W.numel() / 16
            line = (f"quantize_4bit {N}x{K} {str(dt)[6:]:8}: kernel {tk * 1e3:7.2f} ms ({nbytes / tk / 1e9:5.2f} GB/s), "
                    f"public API with double quant + validation {t * 1e3:7.2f} ms")
            if bnbf is not None:
                tb = bench(lambda: bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4"), reps)
                line += f"  bnb {tb * 1e3:7.2f} ms -> {tb / t:5.2f}x"
            print(line)

    if "gemv" in only or "gemm" in only or "bwd" in only:
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
        Ms = ([1, 4, 8, 16] if "gemv" in only else []) + ([17, 32, 64, 256] if "gemm" in only else [])
        for (N, K) in shapes:
            Wf = torch.randn(N, K)
            packed, qs = nf4kit.quantize_4bit(Wf, blocksize=64, compress_statistics=True)
            Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32)
            Wbf = Wd.bfloat16()
            for M in Ms:
                for dt in (torch.float32, torch.bfloat16):
                    x = torch.randn(M, K, dtype=dt)
                    with nf4kit.use_backend("cpu"):
                        t = bench(lambda: nf4kit.matmul_4bit(x, packed, qs), reps)
                        assert backends.last_backend["matmul_4bit"] == "cpu"
                    tl = bench(lambda: torch.nn.functional.linear(x.float(), Wd), reps)
                    line = (f"matmul_4bit M={M:4d} {N}x{K} {str(dt)[6:]:8}: {t * 1e3:8.2f} ms "
                            f"({N * K / 2 / t / 1e9:5.2f} GB/s of packed W)  fp32 F.linear {tl * 1e3:8.2f} ms -> "
                            f"{tl / t:5.2f}x")
                    if dt == torch.bfloat16:
                        tlb = bench(lambda: torch.nn.functional.linear(x, Wbf), reps)
                        line += f"  bf16 F.linear {tlb * 1e3:8.2f} ms -> {tlb / t:5.2f}x"
                    print(line)
            if "bwd" in only:
                for M in (1, 4, 8, 16, 64):
                    dy = torch.randn(M, N)
                    st = ops.state_args(qs)
                    with nf4kit.use_backend("cpu"):
                        t = bench(lambda: ops.matmul_4bit_backward_input(dy, packed.view(-1), *st, 64, "nf4", N, K,
                                                                         None, None, 1.0), reps)
                        assert backends.last_backend["matmul_4bit_backward_input"] == "cpu"
                    tl = bench(lambda: dy @ Wd, reps)
                    print(f"backward_input M={M:4d} {N}x{K} fp32: {t * 1e3:8.2f} ms   dense dy@W {tl * 1e3:8.2f} ms "
                          f"-> {tl / t:5.2f}x")

    if "int8" in only:
        X = torch.randn(4096, 4096)
        for bs in (0, 4096):
            with nf4kit.use_backend("cpu"):
                tq = bench(lambda: ops.quantize_absmax_int8(X, bs), reps)
                q, a = ops.quantize_absmax_int8(X, bs)
                td = bench(lambda: ops.dequantize_absmax_int8(q, a, bs, torch.float32), reps)
            with nf4kit.use_backend("torch"):
                tqr = bench(lambda: ops.quantize_absmax_int8(X, bs), reps)
                tdr = bench(lambda: ops.dequantize_absmax_int8(q, a, bs, torch.float32), reps)
            print(f"int8 absmax 4096x4096 blocksize={bs}: quantize {tq * 1e3:6.2f} ms ({tqr / tq:4.1f}x torch ref), "
                  f"dequantize {td * 1e3:6.2f} ms ({tdr / td:4.1f}x torch ref)")


if __name__ == "__main__":
    main()
