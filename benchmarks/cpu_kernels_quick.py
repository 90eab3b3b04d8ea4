"""Quick timings of the `cpu` backend's C++ kernels (a measurement script, not a test).

    python benchmarks/cpu_kernels_quick.py [--only dequant,quant,gemv,gemm,bwd,int8,isa] [--reps 7]

`--only isa` runs the interleaved A/B of the two CPU targets (AVX-512 vs AVX2 in one process,
min and median of --rounds rounds, every variant once per round, so that load from other
processes hits all variants alike): dequantize_4bit 4096x14336 nested -> bf16 against the
copy_ bandwidth and bitsandbytes, and matmul_4bit M=1 4096x4096 fp32 against F.linear.

Prints, for Llama-shaped weights: time (median), GB/s moved, the fraction of the copy
bandwidth measured in the same run (torch clone of a 256 MiB tensor: read + write, fresh
output each call, like a dequantize), the ratio to bitsandbytes' CPU path when it is
installed, and for matmuls the ratio to torch's F.linear on the dense weight.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import nf4kit
from nf4kit import backends, ops

# Run as a script (python benchmarks/cpu_kernels_quick.py): the repository root holds `benchmarks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import anchors  # noqa: E402


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


def interleaved(fns: dict, rounds: int) -> dict:
    """{name: (min s, median s)}: every fn once per round, in turn, after one warm-up each."""
    for f in fns.values():
        f()
    ts: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: (min(v), statistics.median(v)) for k, v in ts.items()}


def isa_ab(rounds: int, bnbf) -> None:
    """AVX-512 vs AVX2 (vs the generic path for dequantize) on the two CPU targets, interleaved."""
    from nf4kit.backends import _native
    from nf4kit.backends import cpu as cpu_backend

    C = _native.load()
    isas = [i for i in ("avx512", "avx2") if cpu_backend.cap_isa(i) == i]
    cpu_backend.cap_isa("avx512")

    def under(isa, fn):
        def run():
            cpu_backend.cap_isa(isa)
            fn()
        return run

    # -- dequantize 4096x14336 nested -> bf16
    N, K = 4096, 14336
    W = torch.randn(N, K, dtype=torch.bfloat16)
    n = W.numel()
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    pk = packed.reshape(-1)
    keep, (a, aq, na, nc, off) = cpu_backend._state(*ops.state_args(qs))
    out = torch.empty(n, dtype=torch.bfloat16)
    big = torch.empty(32 * 1024 * 1024, dtype=torch.float32).uniform_()
    cout = torch.empty_like(big)

    def into(buf):
        return lambda: C.cpu.dequantize_4bit(_native.ptr(pk), a, aq, na, nc, off, n, 64, 0, _native.ptr(buf), 2)

    fns = {"copy_ 256MiB": lambda: cout.copy_(big)}
    for i in isas:
        fns[f"{i} into existing"] = under(i, into(out))
        fns[f"{i} public API (fresh)"] = under(i, lambda: nf4kit.dequantize_4bit(packed, qs, dtype=torch.bfloat16))
    if bnbf is not None:
        bp, bqs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        fns["bitsandbytes"] = lambda: bnbf.dequantize_4bit(bp, bqs)
    with nf4kit.use_backend("cpu"):
        res = interleaved(fns, rounds)
    cpu_backend.cap_isa("avx512")
    copy_bw = [2 * big.numel() * 4 / t / 1e9 for t in res["copy_ 256MiB"]]
    nbytes = n / 2 + n * 2 + n / 64
    print(f"copy_ 256 MiB: {copy_bw[0]:.2f} GB/s best, {copy_bw[1]:.2f} GB/s median")
    tb = res.get("bitsandbytes")
    for k, (tmin, tmed) in res.items():
        if k.startswith("copy_"):
            continue
        g0, g1 = nbytes / tmin / 1e9, nbytes / tmed / 1e9
        line = (f"dequantize_4bit {N}x{K} nested -> bf16 [{k:26}] min {tmin * 1e3:7.2f} ms ({g0:5.2f} GB/s, "
                f"{g0 / copy_bw[0]:4.2f}x best copy_)  median {tmed * 1e3:7.2f} ms ({g1:5.2f} GB/s, "
                f"{g1 / copy_bw[1]:4.2f}x median copy_)")
        if tb is not None and k != "bitsandbytes":
            line += f"  bnb/this: min {tb[0] / tmin:4.2f}x median {tb[1] / tmed:4.2f}x"
        print(line)
    del keep, out, big, cout

    # -- matmul_4bit M = 1, 4096x4096, fp32
    for (N, K) in ((4096, 4096), (14336, 4096), (4096, 14336)):
        Wf = torch.randn(N, K)
        packed, qs = nf4kit.quantize_4bit(Wf, blocksize=64, compress_statistics=True)
        Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32)
        for M in (1, 4, 16):
            x = torch.randn(M, K)
            fns = {"F.linear fp32": lambda: torch.nn.functional.linear(x, Wd)}
            for i in isas:
                fns[i] = under(i, lambda: nf4kit.matmul_4bit(x, packed, qs))
            with nf4kit.use_backend("cpu"):
                res = interleaved(fns, rounds)
                assert backends.last_backend["matmul_4bit"] == "cpu"
            cpu_backend.cap_isa("avx512")
            tl = res["F.linear fp32"]
            print(f"matmul_4bit M={M:2d} {N}x{K} fp32: F.linear min {tl[0] * 1e3:6.2f} ms median {tl[1] * 1e3:6.2f} ms")
            for i in isas:
                t = res[i]
                print(f"    {i:7}: min {t[0] * 1e3:6.3f} ms median {t[1] * 1e3:6.3f} ms  -> F.linear/this: "
                      f"min {tl[0] / t[0]:4.2f}x median {tl[1] / t[1]:4.2f}x")
        del Wd


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
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the interleaved `isa` A/B")
    args = ap.parse_args()
    only = set(args.only.split(","))
    reps = args.reps
    torch.manual_seed(0)
    bnb = anchors.bitsandbytes()  # stock bitsandbytes (None when it is missing), as every anchor
    bnbf = bnb.functional if bnb is not None else None
    from nf4kit.backends import cpu as cpu_backend

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, nf4kit cpu isa {cpu_backend.isa()}")
    if "isa" in only:
        isa_ab(args.rounds, bnbf)
        only.discard("isa")
        if not only:
            return
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
