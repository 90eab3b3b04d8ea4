"""Quick GPU timing of the Triton kernels, per config (a measurement, not a test).

    python -m nf4kit.triton_kernels._bench [--quick] [--json out.json]

Times (triton.testing.do_bench medians, CUDA events) on Llama-shaped weights W [N, K] with
double quant, bf16 activations: device copy bandwidth, one-launch dequantize, M = 1 and
M = 16 decode per gemv config, fused forward / backward per tile config at medium and large
M against bf16 cuBLAS (F.linear + LoRA) and dequantize + cuBLAS.  Prints one line per row.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench

import nf4kit
from nf4kit import ops
from nf4kit.triton_kernels import matmul as MM
from nf4kit.triton_kernels import quant as Q

ROWS: list[dict] = []


def _t(fn, rep=40) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3  # microseconds


def row(**kw):
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=300.0)
    a = ap.parse_args()
    t_start = time.time()
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability()
    row(device=torch.cuda.get_device_name(), cap=cap, triton=triton.__version__, torch=torch.__version__)
    # copy bandwidth (read + write)
    buf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    us = _t(lambda: dst.copy_(buf))
    copy_bw = 2 * buf.numel() / us / 1e3
    row(op="copy", bytes=2 * buf.numel(), us=us, GBps=copy_bw)
    del buf, dst
    lora_r = 16
    shapes = [(4096, 14336), (14336, 4096)] if not a.quick else [(4096, 14336)]
    for N, K in shapes:
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
        pk = packed.reshape(-1)
        st = ops.state_args(qs)
        out = torch.empty(N * K, dtype=torch.bfloat16, device=dev)
        us = _t(lambda: Q.dequantize_4bit(pk, *st, 64, "nf4", N * K, torch.bfloat16, out=out))
        nbytes = pk.numel() + qs.absmax.numel() + qs.state2.absmax.numel() * 4 + 2 * N * K
        row(op="dequantize_4bit", N=N, K=K, us=us, GBps=nbytes / us / 1e3, frac_copy=nbytes / us / 1e3 / copy_bw)
        Wd = Q.dequantize_4bit(pk, *st, 64, "nf4", N * K, torch.bfloat16).view(N, K)
        A = torch.randn(lora_r, K, device=dev, dtype=torch.bfloat16) * 0.01
        B = torch.randn(N, lora_r, device=dev, dtype=torch.bfloat16) * 0.01
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, Wd)
            us_cublas = _t(lambda: torch.nn.functional.linear(x, Wd))
            row(op="cublas_linear", M=M, N=N, K=K, us=us_cublas)
            for i, cfg in enumerate(MM.gemv_configs(cap, M == 1)):
                if time.time() - t_start > a.budget_s:
                    break
                with MM.force_config("gemv", cfg):
                    y = MM.matmul_4bit(x, pk, *st, 64, "nf4", N, K, None, None, None, 1.0)
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    us = _t(lambda: MM.matmul_4bit(x, pk, *st, 64, "nf4", N, K, None, None, None, 1.0))
                row(op="gemv", M=M, N=N, K=K, cfg=str(cfg), us=us, GBps=(pk.numel() + qs.absmax.numel()) / us / 1e3,
                    vs_cublas=us_cublas / us, rel_err=err)
        # medium / large M: fused per config, dequant + cuBLAS, cuBLAS + LoRA
        for M in ((256, 4096) if not a.quick else (4096,)):
            if time.time() - t_start > a.budget_s:
                break
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)

            def dense():
                y = torch.nn.functional.linear(x, Wd)
                return y.addmm_(x @ A.t(), B.t(), alpha=2.0)

            us_dense = _t(dense)
            ref = dense()
            row(op="cublas_linear_lora", M=M, N=N, K=K, us=us_dense)
            old = (MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD)
            MM.DEQUANT_GEMM_MIN_M = 1
            us_dg = _t(lambda: MM.matmul_4bit(x, pk, *st, 64, "nf4", N, K, None, A, B, 2.0))
            row(op="dequant_cublas_lora", M=M, N=N, K=K, us=us_dg, vs_dense=us_dense / us_dg)
            MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD = 0, True   # time the fused kernels themselves
            for i, cfg in enumerate(MM.fused_configs(cap, M > 256)):
                if time.time() - t_start > a.budget_s:
                    break
                with MM.force_config("fused", cfg):
                    y = MM.matmul_4bit(x, pk, *st, 64, "nf4", N, K, None, A, B, 2.0)
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    us = _t(lambda: MM.matmul_4bit(x, pk, *st, 64, "nf4", N, K, None, A, B, 2.0))
                    row(op="fused_fwd", M=M, N=N, K=K, cfg=str(cfg), us=us, vs_dense=us_dense / us, rel_err=err,
                        TFLOPs=2 * M * N * K / us / 1e6)
                    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
                    dref = dy @ Wd
                    dx = MM.matmul_4bit_backward_input(dy, pk, *st, 64, "nf4", N, K, None, None, 1.0)
                    err = float((dx.float() - dref.float()).norm() / dref.float().norm())
                    us = _t(lambda: MM.matmul_4bit_backward_input(dy, pk, *st, 64, "nf4", N, K, None, None, 1.0))
                    us_mm = _t(lambda: dy @ Wd)
                    MM.FUSED_BACKWARD = False
                    us_dg = _t(lambda: MM.matmul_4bit_backward_input(dy, pk, *st, 64, "nf4", N, K, None, None, 1.0))
                    MM.FUSED_BACKWARD = True
                    row(op="fused_bwd_dx", M=M, N=N, K=K, cfg=str(cfg), us=us, cublas_us=us_mm,
                        dequant_cublas_us=us_dg, rel_err=err)
            MM.DEQUANT_GEMM_MIN_M, MM.FUSED_BACKWARD = old
        del W, Wd, packed, qs, out
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
