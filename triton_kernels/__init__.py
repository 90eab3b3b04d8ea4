"""nf4kit's Triton kernels (installed as nf4kit.triton_kernels; used by the `triton` backend).

quant     quantize_4bit, dequantize_4bit (one launch, nested decode), quantize_blockwise,
          dequantize_blockwise — bit-identical to nf4kit/reference.py
matmul    fused dequant-matmul + LoRA forward, split-K decode path (M <= 16), fused backward dX
registry  every @triton.jit kernel with example signatures/constexprs per config, for static
          compilation (triton.compile(ASTSource, target=GPUTarget("cuda", 80|90, 32)))

Import after deciding on TRITON_INTERPRET (CPU tests set it to 1 before importing triton).
"""
from . import matmul, quant  # noqa: F401

__all__ = ["matmul", "quant"]
