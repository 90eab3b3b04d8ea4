"""The `torch` backend: reference.py on any device.  Always available; the last fallback."""
from __future__ import annotations

import torch

from ..reference import (  # noqa: F401  (re-exported as this backend's ops)
    dequantize_4bit,
    dequantize_absmax_int8,
    dequantize_blockwise,
    matmul_4bit,
    matmul_4bit_backward_input,
    quantize_4bit,
    quantize_absmax_int8,
    quantize_blockwise,
)

NAME = "torch"


def is_available() -> bool:
    return True


def serves(device: torch.device) -> bool:
    return True
