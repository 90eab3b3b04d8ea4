"""One decode call that benchmarks/gpu_profile.sh puts under Nsight Compute, M = 1 on the
4096x14336 NF4 weight (bf16, double quant) unless said below, made 4 times (ncu skips the first launches:
compilation, autotuning).  GPU only:  python -m benchmarks.gpu_profile_target CALL, CALL one of
  cuda          the cuda backend's GEMV as committed (M = 1: the tensor-core stream kernel, ring depth 2,
                block-reduced, its finalize on a PDL launch; cuda-rows: the row kernel)
  cuda-r2d4     its 2-rows-per-warp, 4-deep load ring variant (1 split)
  cuda-r4d4     its 4-rows-per-warp, 4-deep load ring variant (heuristic splits)
  cuda-r1d8     its 1-row-per-warp, 8-deep load ring variant (1 split)
  cuda-stream   the memory-order stream GEMV (ring depth 4; cuda-stream8: 8)
  cuda-mma      the tensor-core stream GEMV with its 2-visit load ring, one slice per K-tile and an
                ordinary finalize launch (the default before 2026-11-27c; cuda-mma3: 3 visits;
                cuda-mma-block: each block sums its warps' K-tiles, 4 slices left for the finalize;
                cuda-mma-compact: that kernel two blocks an SM; cuda-mma-compact-t: on 14336x4096)
  cuda-gemm32   M = 32 on the 14336x4096 weight: the table GEMM as committed (one 8-warp block per SM;
                cuda-gemm32-compact: its two-blocks-per-SM form; cuda-gemm32-cluster: that form with
                its 2 K-splits summed in a thread-block cluster, no finalize)
  triton        the triton backend's GEMV as committed (M = 1: its memory-order stream kernel;
                triton-word: the word path it replaced)
  bnb           bitsandbytes' gemv_4bit (from the carried wheel)"""
from __future__ import annotations

import sys

import torch

import nf4kit
from nf4kit.backends import cuda as cb

from . import anchors as anc
from ._settings import PLAIN_MMA

# call -> the cuda backend's settings it changes
_ROWS = dict(GEMV_STREAM=False, GEMV_MMA=False)  # the row kernel (the tensor-core one is the M = 1 default)
_STREAM = dict(GEMV_STREAM=True, GEMV_MMA=False)
VARIANTS = {"cuda-rows": _ROWS,
            "cuda-r2d4": dict(_ROWS, GEMV_ROWS=2, GEMV_DEPTH=4, GEMV_SPLITS=1),
            "cuda-r4d4": dict(_ROWS, GEMV_ROWS=4, GEMV_DEPTH=4),
            "cuda-r1d8": dict(_ROWS, GEMV_ROWS=1, GEMV_DEPTH=8, GEMV_SPLITS=1),
            "cuda-stream": dict(_STREAM, GEMV_STREAM_DEPTH=4),
            "cuda-stream8": dict(_STREAM, GEMV_STREAM_DEPTH=8),
            "cuda-mma": dict(PLAIN_MMA, GEMV_MMA_DEPTH=2),
            "cuda-mma3": dict(PLAIN_MMA, GEMV_MMA_DEPTH=3),
            "cuda-mma-block": dict(PLAIN_MMA, GEMV_MMA_DEPTH=2, GEMV_MMA_BLOCK_REDUCE=True),
            "cuda-mma-compact": dict(PLAIN_MMA, GEMV_MMA_DEPTH=2, GEMV_MMA_BLOCK_REDUCE=True, GEMV_MMA_COMPACT=True),
            "cuda-mma-compact-t": dict(PLAIN_MMA, GEMV_MMA_DEPTH=2, GEMV_MMA_BLOCK_REDUCE=True, GEMV_MMA_COMPACT=True),
            "cuda-gemm32": dict(GEMV_MMA_GEMM=True, GEMV_MMA_GEMM_COMPACT=False),
            "cuda-gemm32-compact": dict(GEMV_MMA_GEMM=True, GEMV_MMA_GEMM_COMPACT=True),
            "cuda-gemm32-cluster": dict(GEMV_MMA_GEMM=True, GEMV_MMA_GEMM_COMPACT=True, GEMV_MMA_GEMM_CLUSTER=True)}
# call -> (M, N, K) where it is not the M = 1 call on 4096x14336
SHAPES = {"cuda-gemm32": (32, 14336, 4096), "cuda-gemm32-compact": (32, 14336, 4096),
          "cuda-gemm32-cluster": (32, 14336, 4096), "cuda-mma-compact-t": (1, 14336, 4096)}


def main(call: str) -> None:
    dev = torch.device("cuda")
    M, N, K = SHAPES.get(call, (1, 4096, 14336))
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    if call == "bnb":
        fn, name = anc.bnb_matmul(x, packed, qs)
        if fn is None:
            raise SystemExit(f"bitsandbytes is not importable: {name}")
    elif call in ("cuda", "triton", "triton-word") or call in VARIANTS:
        if call == "triton-word":
            from nf4kit.triton_kernels import matmul as tm

            tm.GEMV_STREAM = False
        if call in VARIANTS:
            for name, value in VARIANTS[call].items():
                setattr(cb, name, value)
        backend = "triton" if call.startswith("triton") else "cuda"

        def fn():
            with nf4kit.use_backend(backend):
                return nf4kit.matmul_4bit(x, packed, qs)
    else:
        raise SystemExit(f"unknown call {call!r}; see this module's docstring")
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    print("profiled:", call, flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
