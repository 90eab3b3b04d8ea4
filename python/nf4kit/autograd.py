"""Autograd for the fused 4-bit matmul.

The formula is registered on the custom op nf4kit::matmul_4bit itself
(torch.library.register_autograd), so eager mode, torch.compile(fullgraph=True) and
activation checkpointing all see one differentiable op.  Backward saves only the packed
weight, its state and what the LoRA terms need (x and the LoRA matrices): never the
dequantized weight.

  y  = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias
  dx = dy·W + s·(dy·B)·A             (fused op nf4kit::matmul_4bit_backward_input)
  dA = s·(dy·B)ᵀ·x     dB = s·dyᵀ·(x·Aᵀ)     dbias = Σ dy
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, ops
from .format import QuantState, packed_as_bytes


def _setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, bias, lora_A, lora_B,
     lora_scale) = inputs
    ctx.meta = (blocksize, quant_type, N, K, lora_scale)
    has_lora = lora_A is not None
    # x is kept only when a LoRA matrix needs its gradient (dA = s·(dy·B)ᵀ·x); the frozen path
    # needs nothing but the packed weight and its state.
    need_x = has_lora and (lora_A.requires_grad or lora_B.requires_grad)
    ctx.has_lora = has_lora
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x if need_x else None, packed, absmax, nested_absmax, nested_code, offset,
                          lora_A if has_lora else None, lora_B if has_lora else None)


def _backward(ctx, dy: torch.Tensor):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B = ctx.saved_tensors
    blocksize, quant_type, N, K, s = ctx.meta
    dx = dbias = dA = dB = None
    dy = dy.contiguous()
    if ctx.needs_input_grad[0]:
        # dx = dy·deq(W) + s·(dy·B)·A in one fused op: W is dequantized tile by tile, never stored.
        dx = ops.matmul_4bit_backward_input(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            quant_type, N, K, lora_A, lora_B, s)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if ctx.has_lora and (ctx.needs_input_grad[11] or ctx.needs_input_grad[12]):
        cdt = dy.dtype
        A, B = lora_A.to(cdt), lora_B.to(cdt)
        xc = x.to(cdt)
        if ctx.needs_input_grad[11]:
            dA = (s * ((dy @ B).t() @ xc)).to(lora_A.dtype)      # [r, M]·[M, K]
        if ctx.needs_input_grad[12]:
            dB = (s * (dy.t() @ (xc @ A.t()))).to(lora_B.dtype)  # [N, M]·[M, r]
    return dx, None, None, None, None, None, None, None, None, None, dbias, dA, dB, None


torch.library.register_autograd("nf4kit::matmul_4bit", _backward, setup_context=_setup_context)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, qs: QuantState, bias: Optional[torch.Tensor],
                lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """x [..., K] -> [..., N] through the differentiable fused op (arguments already validated).

    Computes in x.dtype — or, inside ``torch.autocast``, in the autocast dtype, as ``F.linear``
    would.  bias / lora_A / lora_B are cast to that dtype with differentiable casts, so their
    gradients come back in their own dtypes.  Any leading dimensions are flattened to M.
    """
    N, K = qs.shape
    amp_dtype = ops.autocast_dtype(x.device.type)
    if amp_dtype is not None:
        x = x.to(amp_dtype)
    cdt = x.dtype
    if bias is not None and bias.dtype != cdt:
        bias = bias.to(cdt)
    if lora_A is not None:
        if lora_A.dtype != cdt:
            lora_A = lora_A.to(cdt)
        if lora_B.dtype != cdt:
            lora_B = lora_B.to(cdt)
    flat_2d = x.dim() == 2  # the common case: no reshape / view round trip (~1 us each)
    x2 = x if flat_2d else x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    args = (x2, packed_as_bytes(packed), *ops.state_args(qs), qs.blocksize, qs.quant_type, N, K, bias, lora_A, lora_B,
            lora_scale)
    if ops.eager_direct(x.device.type, x2, bias, lora_A, lora_B, *args[1:6]):  # inference: skip the dispatcher
        y = backends.run("matmul_4bit", x2.device, *args)
    else:
        y = ops.matmul_4bit(*args)
    return y if flat_2d else y.view(*x.shape[:-1], N)
