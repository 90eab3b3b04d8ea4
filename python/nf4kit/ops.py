"""torch.library custom ops in the `nf4kit` namespace, with fake (meta) kernels so that
torch.compile(fullgraph=True) traces through them, and per-call backend dispatch.

The ops take flat arguments: packed codes as a 1-D uint8 tensor and the quant state as
loose tensors (absmax fp32 [nb], or uint8 [nb] with nested_absmax / nested_code / offset
for double quant).  Validation happens in nf4kit.functional before these are called.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from . import format as fmt


def _nb(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes in on ``device_type``, or None where autocast is off or
    does not know the device type (meta, where a model built under ``init_empty_weights`` runs for
    its shapes; torch raises there rather than answer False)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def eager_direct(device_type: str, *tensors: Optional[Tensor]) -> bool:
    """True when calling the backend straight away is indistinguishable from calling the custom
    op: plain tensors, no autograd to record, no autocast, and no compile, tracing, fake-tensor
    or other dispatch / function mode, and no torch.func transform (under vmap the tensors are
    batched wrappers without storage, which the native backends cannot read; through the op,
    vmap's fallback runs each sample as its own call, the bits of a loop).  The op
    layer costs ~30 us of Python per call (the dispatcher's autograd and autocast wrappers); a
    decode step pays it once per linear layer."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or autocast_dtype(device_type) is not None
            or torch._C._functorch.maybe_current_level() is not None):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


# ---------------------------------------------------------------- 4-bit
@torch.library.custom_op("nf4kit::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """A (any shape) -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    return backends.run("quantize_4bit", A.device, A, blocksize, quant_type)


@quantize_4bit.register_fake
def _(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    n = A.numel()
    return A.new_empty(((n + 1) // 2,), dtype=torch.uint8), A.new_empty((_nb(n, blocksize),), dtype=torch.float32)


@torch.library.custom_op("nf4kit::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                    offset: Optional[Tensor], blocksize: int, quant_type: str, numel: int,
                    dtype: torch.dtype) -> Tensor:
    """packed uint8 [(numel+1)//2] -> [numel] in dtype, double-quant decode included."""
    return backends.run("dequantize_4bit", packed.device, packed, absmax, nested_absmax, nested_code, offset,
                        blocksize, quant_type, numel, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("nf4kit::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                        offset: Optional[Tensor], blocksize: int, quant_type: str, numel: int, out: Tensor) -> None:
    """dequantize_4bit into a preallocated contiguous `out` [numel] (its dtype is the output dtype)."""
    backends.run("dequantize_4bit_out", packed.device, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                 quant_type, numel, out)


@dequantize_4bit_out.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, numel, out):
    return None


# ---------------------------------------------------------------- 8-bit dynamic map
@torch.library.custom_op("nf4kit::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """A [n] -> (uint8 [n], absmax fp32 [ceil(n/blocksize)]) with the sorted 256-entry `code`."""
    return backends.run("quantize_blockwise", A.device, A, code, blocksize)


@quantize_blockwise.register_fake
def _(A, code, blocksize):
    n = A.numel()
    return A.new_empty((n,), dtype=torch.uint8), A.new_empty((_nb(n, blocksize),), dtype=torch.float32)


@torch.library.custom_op("nf4kit::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """uint8 [n] -> [n] in dtype."""
    return backends.run("dequantize_blockwise", q.device, q, absmax, code, blocksize, dtype)


@dequantize_blockwise.register_fake
def _(q, absmax, code, blocksize, dtype):
    return q.new_empty((q.numel(),), dtype=dtype)


# ---------------------------------------------------------------- int8 absmax
@torch.library.custom_op("nf4kit::quantize_absmax_int8", mutates_args=())
def quantize_absmax_int8(X: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """X [n] -> (int8 [n], absmax fp32 [nblocks]); blocksize 0 = one scale for the tensor."""
    return backends.run("quantize_absmax_int8", X.device, X, blocksize)


@quantize_absmax_int8.register_fake
def _(X, blocksize):
    n = X.numel()
    return X.new_empty((n,), dtype=torch.int8), X.new_empty((1 if blocksize == 0 else _nb(n, blocksize),),
                                                            dtype=torch.float32)


@torch.library.custom_op("nf4kit::dequantize_absmax_int8", mutates_args=())
def dequantize_absmax_int8(q: Tensor, absmax: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    return backends.run("dequantize_absmax_int8", q.device, q, absmax, blocksize, dtype)


@dequantize_absmax_int8.register_fake
def _(q, absmax, blocksize, dtype):
    return q.new_empty((q.numel(),), dtype=dtype)


# ---------------------------------------------------------------- matmuls
@torch.library.custom_op("nf4kit::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                nested_code: Optional[Tensor], offset: Optional[Tensor], blocksize: int, quant_type: str, N: int,
                K: int, bias: Optional[Tensor], lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                lora_scale: float) -> Tensor:
    """x [M, K] -> x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias, [M, N] in x.dtype (W [N, K], A [r, K], B [N, r])."""
    return backends.run("matmul_4bit", x.device, x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                        quant_type, N, K, bias, lora_A, lora_B, lora_scale)


@matmul_4bit.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, bias, lora_A, lora_B,
      lora_scale):
    return x.new_empty((x.shape[0], N))


@torch.library.custom_op("nf4kit::matmul_4bit_backward_input", mutates_args=())
def matmul_4bit_backward_input(dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                               nested_code: Optional[Tensor], offset: Optional[Tensor], blocksize: int,
                               quant_type: str, N: int, K: int, lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                               lora_scale: float) -> Tensor:
    """dy [M, N] -> dy·deq(W) + s·(dy·B)·A, [M, K] in dy.dtype."""
    return backends.run("matmul_4bit_backward_input", dy.device, dy, packed, absmax, nested_absmax, nested_code,
                        offset, blocksize, quant_type, N, K, lora_A, lora_B, lora_scale)


@matmul_4bit_backward_input.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, N, K, lora_A, lora_B,
      lora_scale):
    return dy.new_empty((dy.shape[0], K))


ALL_OPS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "dequantize_4bit_out": dequantize_4bit_out,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "quantize_absmax_int8": quantize_absmax_int8,
    "dequantize_absmax_int8": dequantize_absmax_int8,
    "matmul_4bit": matmul_4bit,
    "matmul_4bit_backward_input": matmul_4bit_backward_input,
}


def state_args(qs: fmt.QuantState) -> tuple:
    """(absmax, nested_absmax, nested_code, offset) of a QuantState, as the ops take them."""
    if qs.nested:
        return qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset
    return qs.absmax, None, None, None
