"""The `triton` backend: the Triton kernels of nf4kit.triton_kernels (triton_kernels/ in the
source tree).  CUDA tensors on a GPU; CPU tensors only under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported — how CI runs these kernels).

Ops have the signatures of nf4kit/reference.py; arguments are validated by nf4kit.functional
before they get here.  An op returns NotImplemented for what it does not serve (another
dtype, a LoRA rank above 256, a non power-of-two 8-bit blocksize); the next backend then runs.
quantize_absmax_int8 / dequantize_absmax_int8 are not implemented here (torch serves them).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

NAME = "triton"

_kernels = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """triton importable, and a GPU or the interpreter to run its kernels."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def serves(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _k():
    global _kernels
    if _kernels is None:
        from .. import triton_kernels as tk

        _kernels = tk
    return _kernels


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """A (any shape) -> (packed uint8 [(n+1)//2], absmax fp32 [nb]); bit-exact with the reference."""
    if A.dtype not in _FLOAT:
        return NotImplemented
    return _k().quant.quantize_4bit(A, blocksize, quant_type)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                    quant_type: str, numel: int, dtype: torch.dtype):
    """packed uint8 [(numel+1)//2] -> [numel] in dtype, one launch, nested decode in-kernel."""
    if dtype not in _FLOAT:
        return NotImplemented
    return _k().quant.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                                      numel, dtype)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    if A.dtype not in _FLOAT:
        return NotImplemented
    return _k().quant.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype):
    if dtype not in _FLOAT:
        return NotImplemented
    return _k().quant.dequantize_blockwise(q, absmax, code, blocksize, dtype)


def matmul_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, bias, lora_A,
                lora_B, lora_scale):
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype (fused kernels)."""
    return _k().matmul.matmul_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N,
                                   K, bias, lora_A, lora_B, lora_scale)


def matmul_4bit_backward_input(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K,
                               lora_A, lora_B, lora_scale):
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype (fused kernel, W read transposed)."""
    return _k().matmul.matmul_4bit_backward_input(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                                  quant_type, N, K, lora_A, lora_B, lora_scale)
