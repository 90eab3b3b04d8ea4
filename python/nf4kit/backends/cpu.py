"""The `cpu` backend: C++ kernels of csrc/cpu through nf4kit._C, CPU tensors only.

Arguments are validated by nf4kit.functional before they get here; this module only
prepares contiguous buffers and checks the status code.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import format as fmt
from ._native import DTYPE_CODES, QUANT_TYPE_CODES, check, load, ptr

NAME = "cpu"


def is_available() -> bool:
    C = load()
    return C is not None and bool(getattr(C, "has_cpu", False))


def serves(device: torch.device) -> bool:
    return device.type == "cpu"


def _float_input(A: torch.Tensor) -> torch.Tensor:
    return A.reshape(-1).contiguous()


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    if A.dtype not in DTYPE_CODES:
        return NotImplemented
    x = _float_input(A)
    n = x.numel()
    packed = torch.empty(fmt.packed_nbytes(n), dtype=torch.uint8)
    absmax = torch.empty(fmt.num_blocks(n, blocksize), dtype=torch.float32)
    check(load().cpu.quantize_4bit(ptr(x), DTYPE_CODES[x.dtype], n, blocksize, QUANT_TYPE_CODES[quant_type],
                                   ptr(packed), ptr(absmax)), "cpu.quantize_4bit")
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype):
    if dtype not in DTYPE_CODES:
        return NotImplemented
    packed = packed.contiguous()
    out = torch.empty(numel, dtype=dtype)
    nested = nested_absmax is not None
    absmax = absmax.contiguous()
    check(load().cpu.dequantize_4bit(
        ptr(packed), 0 if nested else ptr(absmax), ptr(absmax) if nested else 0,
        ptr(nested_absmax.contiguous()) if nested else 0, ptr(nested_code.contiguous()) if nested else 0,
        ptr(offset.reshape(1).contiguous()) if nested else 0, numel, blocksize, QUANT_TYPE_CODES[quant_type],
        ptr(out), DTYPE_CODES[dtype]), "cpu.dequantize_4bit")
    return out


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    if A.dtype not in DTYPE_CODES:
        return NotImplemented
    x = _float_input(A)
    code = code.float().contiguous()
    q = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(fmt.num_blocks(x.numel(), blocksize), dtype=torch.float32)
    check(load().cpu.quantize_blockwise(ptr(x), DTYPE_CODES[x.dtype], x.numel(), blocksize, ptr(code), ptr(q),
                                        ptr(absmax)), "cpu.quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype):
    if dtype not in DTYPE_CODES:
        return NotImplemented
    q = q.reshape(-1).contiguous()
    out = torch.empty(q.numel(), dtype=dtype)
    check(load().cpu.dequantize_blockwise(ptr(q), ptr(absmax.float().contiguous()), ptr(code.float().contiguous()),
                                          q.numel(), blocksize, ptr(out), DTYPE_CODES[dtype]),
          "cpu.dequantize_blockwise")
    return out
