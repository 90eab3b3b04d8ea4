"""nf4kit: CUDA and Triton kernels for QLoRA.

Block-wise NF4/FP4 quantization bit-identical to bitsandbytes 0.50, double quantization of
the block constants, and a fused dequant-matmul + LoRA with autograd, behind one op layer
with four backends (cuda, triton, cpu, torch).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import format, ops, reference  # noqa: F401  (ops registers the nf4kit:: custom ops)
from .backends import available_backends, use_backend
from .format import QuantState
from .functional import (
    dequantize_4bit,
    dequantize_absmax_int8,
    dequantize_blockwise,
    matmul_4bit,
    quantize_4bit,
    quantize_absmax_int8,
    quantize_blockwise,
)
from . import autograd  # noqa: F401,E402  (registers the matmul autograd formula)
from . import nn  # noqa: E402
from ._build import build_info  # noqa: E402

try:  # the layers of issue 7
    from .nn import LoraConfig, quantize_model  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "QuantState", "available_backends", "build_info", "dequantize_4bit", "dequantize_absmax_int8",
    "dequantize_blockwise", "matmul_4bit", "quantize_4bit", "quantize_absmax_int8", "quantize_blockwise",
    "use_backend", "nn", "ops", "reference", "format",
]

try:  # issue 5: nf4kit.from_pretrained (transformers itself is imported lazily, on call)
    from .integrations.transformers import from_pretrained  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass
