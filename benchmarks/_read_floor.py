"""A pure read of a buffer's 32-bit words (XOR-summed per program, one word written per program):
the floor a bandwidth-bound kernel of that size meets in the benchmark harness.  Triton, GPU only
(imported by benchmarks.gpu_sweep's floor section)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_words(src, out, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for it in tl.static_range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n_words, other=0, cache_modifier=".cg")
    tl.store(out + pid, tl.xor_sum(acc, axis=0))


def read_words(words: torch.Tensor, block: int, iters: int, warps: int) -> torch.Tensor:
    """XOR of each run of block * iters words of `words` (int32, contiguous): int32 [programs]."""
    n = words.numel()
    grid = (triton.cdiv(n, block * iters),)
    out = torch.empty(grid[0], device=words.device, dtype=torch.int32)
    _read_words[grid](words, out, n, BLOCK=block, ITERS=iters, num_warps=warps)
    return out
