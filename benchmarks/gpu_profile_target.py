"""The M = 1 decode calls that benchmarks/gpu_profile.sh puts under Nsight Compute: nf4kit's cuda
and triton GEMVs and bitsandbytes' gemv_4bit on the 4096x14336 NF4 weight (bf16, double quant),
each called 6 times (ncu skips the first launches: compilation, autotuning).  GPU only."""
from __future__ import annotations

import torch

import nf4kit

from . import anchors as anc


def main() -> None:
    dev = torch.device("cuda")
    W = torch.randn(4096, 14336, device=dev, dtype=torch.bfloat16)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    x = torch.randn(1, 14336, device=dev, dtype=torch.bfloat16)
    calls = [(b, (lambda b=b: nf4kit.matmul_4bit(x, packed, qs))) for b in ("cuda", "triton")]
    fn, name = anc.bnb_matmul(x, packed, qs)
    if fn is not None:
        calls.append((name, fn))
    for name, f in calls:
        with nf4kit.use_backend(name if name in ("cuda", "triton") else "torch"):
            for _ in range(6):
                f()
        torch.cuda.synchronize()
        print("profiled:", name, flush=True)


if __name__ == "__main__":
    main()
