"""Pure-PyTorch implementation of every nf4kit op: the oracle the kernels are tested
against, and the `torch` backend (any device).

The functions take the op layer's flat arguments (see nf4kit/ops.py): packed codes as a
1-D uint8 tensor, the quant state as loose tensors.  Arithmetic follows DESIGN.md §3:
  xn = x * fp32(1 / max(absmax, 1e-38));  code = #midpoints < xn (ties to the lower code)
  out = T(fp32(table[code]) * fp32(absmax))
  nested absmax = fp32(fp32(map[q] * nested_absmax[i // 256]) + offset)
"""
from __future__ import annotations

from typing import Optional

import torch

from . import format as fmt


# ---------------------------------------------------------------- 4-bit
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (any shape, fp32/fp16/bf16) -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    x = A.reshape(-1).float()
    n = x.numel()
    nb = fmt.num_blocks(n, blocksize)
    blocks = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    xn = blocks * inv[:, None]
    thresholds, order = fmt.quant_thresholds(quant_type)
    codes = order.to(x.device)[torch.bucketize(xn.reshape(-1)[:n], thresholds.to(x.device))]
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), fmt.zero_code(quant_type))])
    codes = codes.to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [(n+1)//2] -> int64 codes [n] (high nibble first)."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


def decode_absmax(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor]) -> torch.Tensor:
    """Block absmax as fp32: itself, or the double-quant decode (a multiply, then an add)."""
    if nested_absmax is None:
        return absmax.float()
    idx = torch.arange(absmax.numel(), device=absmax.device) // fmt.NESTED_BLOCKSIZE
    scaled = nested_code[absmax.to(torch.int64)] * nested_absmax[idx]
    return scaled + offset.reshape(())


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(n+1)//2] -> [numel] in dtype."""
    scale = decode_absmax(absmax, nested_absmax, nested_code, offset)
    values = fmt.code_table(quant_type, packed.device)[unpack_codes(packed, numel)]
    idx = torch.arange(numel, device=packed.device) // blocksize
    return (values * scale[idx]).to(dtype)


# ---------------------------------------------------------------- 8-bit dynamic map
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n] -> (uint8 [n] nearest entries of the sorted 256-entry `code`, absmax fp32 [nblocks])."""
    x = A.reshape(-1).float()
    n = x.numel()
    nb = fmt.num_blocks(n, blocksize)
    blocks = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    xn = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)[:n]
    code = code.float()
    midpoints = (code[:-1] + code[1:]) * 0.5
    q = torch.bucketize(xn, midpoints).to(torch.uint8)
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    n = q.numel()
    idx = torch.arange(n, device=q.device) // blocksize
    return (code.float()[q.reshape(-1).to(torch.int64)] * absmax.float()[idx]).to(dtype)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax [nb] -> (uint8 codes [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 0-d).

    offset = fp32(mean in fp64): the same value on every backend and device.
    """
    offset = absmax.double().mean().float()
    q, nested = quantize_blockwise(absmax - offset, fmt.dynamic_map().to(absmax.device), fmt.NESTED_BLOCKSIZE)
    return q, nested, offset


# ---------------------------------------------------------------- int8 absmax (textbook)
def quantize_absmax_int8(X: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = round(fp32(127 * fp32(1 / absmax)) * x) (half to even), per tensor (blocksize 0) or per block.

    Returns (int8 [n], absmax fp32 [nblocks] (one entry per tensor when blocksize == 0)).
    """
    x = X.reshape(-1).float()
    n = x.numel()
    bs = n if blocksize == 0 else blocksize
    nb = fmt.num_blocks(n, bs)
    blocks = torch.nn.functional.pad(x, (0, nb * bs - n)).view(nb, bs)
    absmax = blocks.abs().amax(dim=1)
    # c = 127 · (1/absmax): a correctly rounded reciprocal, then one multiply (spelled out,
    # so the arithmetic does not depend on how torch lowers a scalar division).
    c = absmax.clamp(min=1e-30).reciprocal() * 127.0
    q = torch.round(blocks * c[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n], absmax


def dequantize_absmax_int8(q: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """x = fp32(q) * fp32(absmax / 127), cast to dtype."""
    n = q.numel()
    bs = n if blocksize == 0 else blocksize
    idx = torch.arange(n, device=q.device) // bs
    return (q.reshape(-1).float() * (absmax.float() / 127.0)[idx]).to(dtype)


# ---------------------------------------------------------------- matmuls
def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, quant_type: str,
                N: int, K: int, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                lora_B: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype.  W [N, K], A [r, K], B [N, r]."""
    W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K,
                        x.dtype).view(N, K)
    y = torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
    if lora_A is not None:
        y = y + lora_scale * ((x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())
    return y


def matmul_4bit_backward_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                               nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                               offset: Optional[torch.Tensor], blocksize: int, quant_type: str, N: int, K: int,
                               lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                               lora_scale: float) -> torch.Tensor:
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype."""
    W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N * K,
                        dy.dtype).view(N, K)
    dx = dy @ W
    if lora_A is not None:
        dx = dx + lora_scale * ((dy @ lora_B.to(dy.dtype)) @ lora_A.to(dy.dtype))
    return dx
