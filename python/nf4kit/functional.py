"""The user API of DESIGN.md §4.  Every call validates its inputs here, in Python, before
any kernel launch: bad input raises ValueError / TypeError naming the problem.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import autograd, ops
from . import format as fmt
from .format import QuantState


# ---------------------------------------------------------------- validation helpers
_FP32_MAX = torch.finfo(torch.float32).max


def _check_float_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device: it has no values to quantize (build the layer on meta "
                         "and fill it with load_state_dict, or quantize the real tensor)")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} NaN/Inf value(s); cannot quantize non-finite values")


def _check_same_device(named: dict[str, Optional[torch.Tensor]]) -> None:
    # One comparison per tensor on every call (the decode path runs this per layer); the message
    # naming every tensor's device is built only on a mismatch.
    first = None
    for v in named.values():
        if isinstance(v, torch.Tensor):
            if first is None:
                first = v.device
            elif v.device != first:
                desc = ", ".join(f"{k} on {t.device}" for k, t in named.items() if isinstance(t, torch.Tensor))
                raise ValueError(f"tensors are on different devices: {desc}")


def _check_nonempty(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; nothing to quantize")


# ---------------------------------------------------------------- 4-bit
def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Block-wise 4-bit quantization, bit-identical to bitsandbytes.

    A: any shape, float32 / float16 / bfloat16, finite.  Flattened row-major into blocks of
    `blocksize` consecutive elements (the tail block has its own absmax).
    Returns packed [(n+1)//2 / itemsize(quant_storage), 1] and a QuantState (absmax fp32, or
    with compress_statistics the double-quantized absmax: uint8 + nested fp32 + offset).
    """
    _check_float_tensor(A, "A")
    fmt.check_quant_type(quant_type)
    fmt.check_blocksize(blocksize)
    if quant_storage not in fmt.QUANT_STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {fmt.QUANT_STORAGE_DTYPES}, got {quant_storage}")
    _check_nonempty(A, "A")
    _check_finite(A, "A")
    n = A.numel()
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if fmt.packed_nbytes(n) % itemsize:
        raise ValueError(f"{fmt.packed_nbytes(n)} packed bytes do not fill whole {quant_storage} elements; "
                         "use quant_storage=torch.uint8 for this tensor")
    packed, absmax = ops.quantize_4bit(A.contiguous(), blocksize, quant_type)
    state2 = offset = None
    if compress_statistics:
        absmax, state2, offset = _double_quantize(absmax)
    qs = QuantState(absmax=absmax, shape=A.shape, code=fmt.code_table(quant_type, A.device), blocksize=blocksize,
                    quant_type=quant_type, dtype=A.dtype, offset=offset, state2=state2)
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1), qs


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, QuantState, torch.Tensor]:
    # offset = fp32(mean in fp64): one definition, the same on every backend and device.
    offset = absmax.double().mean().float()
    code = fmt.dynamic_map().to(absmax.device)
    q, nested_absmax = ops.quantize_blockwise(absmax - offset, code, fmt.NESTED_BLOCKSIZE)
    state2 = QuantState(absmax=nested_absmax, code=code, blocksize=fmt.NESTED_BLOCKSIZE, dtype=torch.float32)
    return q, state2, offset


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState, dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """packed + QuantState -> tensor of shape quant_state.shape, dtype quant_state.dtype (or `dtype`).

    out = dtype(fp32(table[code]) * fp32(absmax[block])), the nested absmax decoded in the
    same launch.  Bit-identical on every backend.  `out`: a preallocated contiguous tensor of
    quant_state.numel elements to write into (its dtype is the output dtype); it is returned
    viewed as quant_state.shape.  Writing into mapped memory skips the page faults of a fresh
    allocation, which dominate on a CPU.
    """
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a nf4kit QuantState, got {type(quant_state).__name__}")
    quant_state.validate(packed)
    n = quant_state.numel
    args = (fmt.packed_as_bytes(packed), *ops.state_args(quant_state), quant_state.blocksize, quant_state.quant_type,
            n)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        if out.dtype not in fmt.FLOAT_DTYPES or (dtype is not None and dtype != out.dtype):
            raise TypeError(f"out must be float32, float16 or bfloat16 (and match dtype), got {out.dtype}")
        if out.numel() != n or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with {n} elements, got {tuple(out.shape)} "
                             f"({'contiguous' if out.is_contiguous() else 'not contiguous'})")
        _check_same_device({"packed": packed, "out": out})
        ops.dequantize_4bit_out(*args, out.view(-1))
        return out.view(quant_state.shape)
    dtype = quant_state.dtype if dtype is None else dtype
    if dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return ops.dequantize_4bit(*args, dtype).view(quant_state.shape)


# ---------------------------------------------------------------- 8-bit blockwise
def quantize_blockwise(A: torch.Tensor, blocksize: int = 256,
                       code: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, QuantState]:
    """8-bit block-wise quantization with the signed dynamic map (as bitsandbytes).

    Returns uint8 codes of A's shape and a QuantState (absmax fp32 [nblocks], code fp32 [256]).
    """
    _check_float_tensor(A, "A")
    fmt.check_blocksize(blocksize)
    _check_nonempty(A, "A")
    _check_finite(A, "A")
    if code is None:
        code = fmt.dynamic_map().to(A.device)
    else:
        if not isinstance(code, torch.Tensor):
            raise TypeError(f"code must be a tensor of 256 values, got {type(code).__name__}")
        if code.numel() != 256 or not code.dtype.is_floating_point:
            raise ValueError("code must be a floating tensor of 256 sorted values")
        _check_same_device({"A": A, "code": code})
        code = code.float()
        if not bool((code[1:] >= code[:-1]).all()):
            raise ValueError("code must be sorted ascending")
    q, absmax = ops.quantize_blockwise(A.contiguous(), code, blocksize)
    return q.view(A.shape), QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize,
                                       dtype=A.dtype)


def dequantize_blockwise(q: torch.Tensor, quant_state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 codes + QuantState of quantize_blockwise -> tensor of q's shape."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError("q must be a uint8 tensor")
    if not q.is_contiguous():  # the blocks are runs of the codes in memory order, as quantized
        raise ValueError("q must be contiguous (the codes of quantize_blockwise, in its layout)")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a nf4kit QuantState, got {type(quant_state).__name__}")
    absmax, code = quant_state.absmax, quant_state.code
    if not isinstance(absmax, torch.Tensor) or not isinstance(code, torch.Tensor):
        raise TypeError("quant_state.absmax and quant_state.code must be tensors")
    fmt.check_blocksize(quant_state.blocksize)
    if absmax.numel() != fmt.num_blocks(q.numel(), quant_state.blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, {q.numel()} codes in blocks of "
                         f"{quant_state.blocksize} need {fmt.num_blocks(q.numel(), quant_state.blocksize)}")
    if code is None or code.numel() != 256:
        raise ValueError("quant_state.code must have 256 entries")
    _check_same_device({"q": q, "absmax": absmax, "code": code})
    dtype = dtype or quant_state.dtype or torch.float32
    if dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = ops.dequantize_blockwise(q.reshape(-1).contiguous(), absmax.float(), code.float(), quant_state.blocksize,
                                   dtype)
    return out.view(q.shape)


# ---------------------------------------------------------------- int8 absmax
def quantize_absmax_int8(X: torch.Tensor, blocksize: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook absmax int8: q = round(127 / absmax · X).

    Per tensor (blocksize None: scale is a 0-d fp32 absmax) or per block of `blocksize`
    consecutive elements (scale fp32 [nblocks]).  Returns (int8 of X's shape, scale = absmax).
    """
    _check_float_tensor(X, "X")
    _check_nonempty(X, "X")
    _check_finite(X, "X")
    if blocksize is not None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
    q, absmax = ops.quantize_absmax_int8(X.contiguous(), blocksize or 0)
    return q.view(X.shape), (absmax.reshape(()) if blocksize is None else absmax)


def dequantize_absmax_int8(q: torch.Tensor, scale: torch.Tensor, blocksize: Optional[int] = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_absmax_int8 (pass the same blocksize): fp32(q) · absmax / 127."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError("q must be an int8 tensor")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be the fp32 tensor quantize_absmax_int8 returned, got {type(scale).__name__}")
    if dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if blocksize is not None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
        if not q.is_contiguous():  # blocks are runs of the codes in memory order, as quantized
            raise ValueError("q must be contiguous when blocksize is given (the codes in quantize's layout)")
    need = 1 if blocksize is None else fmt.num_blocks(q.numel(), blocksize)
    if scale.numel() != need:
        raise ValueError(f"scale has {scale.numel()} entries, expected {need}")
    _check_same_device({"q": q, "scale": scale})
    out = ops.dequantize_absmax_int8(q.reshape(-1).contiguous(), scale.reshape(-1).float(), blocksize or 0, dtype)
    return out.view(q.shape)


# ---------------------------------------------------------------- matmul
def check_lora(lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], N: int, K: int) -> None:
    """A LoRA pair for a weight [N, K]: both or neither, float, A [r, K] and B [N, r]."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        _check_float_tensor(lora_A, "lora_A")
        _check_float_tensor(lora_B, "lora_B")
        if lora_A.dim() != 2 or lora_A.shape[1] != K:
            raise ValueError(f"lora_A must be [r, {K}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[0]
        if lora_B.shape != (N, r):
            raise ValueError(f"lora_B must be [{N}, {r}], got {tuple(lora_B.shape)}")


def check_matmul_args(x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState,
                      bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                      lora_B: Optional[torch.Tensor]) -> tuple[int, int]:
    """Validates a matmul_4bit call; returns (N, K) of the weight."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a nf4kit QuantState, got {type(quant_state).__name__}")
    quant_state.validate(packed)
    if len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight [out, in], the quant_state shape is {tuple(quant_state.shape)}")
    N, K = quant_state.shape
    _check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has last dimension {x.shape[-1] if x.dim() else None}, the weight needs in_features={K}")
    if bias is not None:
        _check_float_tensor(bias, "bias")
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    check_lora(lora_A, lora_B, N, K)
    _check_same_device({"x": x, "packed": packed, "absmax": quant_state.absmax, "bias": bias, "lora_A": lora_A,
                        "lora_B": lora_B})
    return N, K


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor] = None,
                lora_A: Optional[torch.Tensor] = None, lora_B: Optional[torch.Tensor] = None,
                lora_scale: float = 1.0) -> torch.Tensor:
    """y = x·deq(W)ᵀ + lora_scale·(x·Aᵀ)·Bᵀ + bias, with autograd.

    x [..., K] fp32/fp16/bf16; W [N, K] packed with its QuantState; bias [N]; lora_A [r, K];
    lora_B [N, r].  Computes in x.dtype with fp32 accumulation; returns [..., N] in x.dtype.
    Gradients flow to x, bias, lora_A and lora_B, never to the frozen weight.
    """
    check_matmul_args(x, packed, quant_state, bias, lora_A, lora_B)
    if type(lora_scale) is not float and (isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real)):
        raise TypeError(f"lora_scale must be a number, got {type(lora_scale).__name__}")
    if not -_FP32_MAX <= lora_scale <= _FP32_MAX:  # also false for NaN
        raise ValueError(f"lora_scale must be finite in fp32, got {lora_scale}")
    return autograd.matmul_4bit(x, packed, quant_state, bias, lora_A, lora_B, float(lora_scale))
