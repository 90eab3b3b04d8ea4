"""Drop-in layers: ``Linear4bit``, ``LoRALinear4bit`` and ``quantize_model`` (DESIGN.md §4).

``Linear4bit`` is bitsandbytes' 4-bit linear layer, rebuilt on nf4kit's ops:

* it subclasses ``nn.Linear`` (PEFT's "all-linear", transformers and many tools key on that);
* ``weight`` is a frozen uint8 ``Parameter`` holding the packed codes ``[(n+1)//2, 1]`` and the
  layer's ``quant_state`` (a :class:`nf4kit.QuantState`, also attached as
  ``weight.quant_state`` as bitsandbytes does);
* its ``state_dict`` uses bitsandbytes' keys (``weight``, ``bias``, ``weight.absmax``,
  ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
  ``weight.quant_state.bitsandbytes__nf4``) and ``load_state_dict`` reads them back — its own,
  a bitsandbytes-saved one, or a plain float ``weight`` (which is quantized on load).

``LoRALinear4bit`` wraps a ``Linear4bit`` with PEFT's attribute names (``base_layer``,
``lora_A``/``lora_B`` ``ModuleDict``s keyed by adapter name, ``scaling``, ``lora_dropout``), so
PEFT-format adapter state dicts map onto it one to one.  Its forward is one fused op:
``y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias``.

Every forward goes through the ``nf4kit::matmul_4bit`` custom op with the QuantState's tensors
as arguments and its python metadata as constants, so ``torch.compile(fullgraph=True)`` traces
a model built of these layers without a graph break.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import format as fmt
from .autograd import matmul_4bit as _matmul_4bit
from .format import QuantState
from .functional import check_lora, check_matmul_args, dequantize_4bit, quantize_4bit
from .ops import autocast_dtype

__all__ = ["Linear4bit", "LoRALinear4bit", "LoraConfig", "quantize_model"]

_QS_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _placeholder_state(shape: tuple[int, int], blocksize: int, compress_statistics: bool, quant_type: str,
                       dtype: torch.dtype, device: torch.device) -> QuantState:
    """An uninitialised QuantState of the right sizes (for layers built on the meta device)."""
    nb = fmt.num_blocks(shape[0] * shape[1], blocksize)
    code = torch.empty(16, dtype=torch.float32, device=device)
    if not compress_statistics:
        return QuantState(torch.empty(nb, dtype=torch.float32, device=device), torch.Size(shape), code, blocksize,
                          quant_type, dtype)
    s2 = QuantState(torch.empty(fmt.num_blocks(nb, fmt.NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                    code=torch.empty(256, dtype=torch.float32, device=device), blocksize=fmt.NESTED_BLOCKSIZE,
                    dtype=torch.float32)
    return QuantState(torch.empty(nb, dtype=torch.uint8, device=device), torch.Size(shape), code, blocksize,
                      quant_type, dtype, torch.empty((), dtype=torch.float32, device=device), s2)


def _check_layer_input(x: Any, in_features: int) -> None:
    """A layer input must be a floating-point tensor [..., in_features] (it is cast to the compute
    dtype, so fp64 is accepted where a compute dtype is set; integer, bool and complex are not)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input has shape {tuple(x.shape)}, the layer needs [..., in_features={in_features}]")


def _finite_number(value: Any, name: str) -> float:
    """A LoRA alpha or scaling as a finite float (NaN or inf would turn every output into NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class Linear4bit(nn.Linear):
    """A linear layer with a frozen 4-bit (NF4/FP4) weight, bitsandbytes-compatible.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: dtype the matmul runs in (the input is cast to it, the output cast back
            to the input's dtype, as bitsandbytes); None: the input's dtype.
        compress_statistics: double-quantize the block absmax (uint8 + nested fp32 + offset).
        quant_type: "nf4" or "fp4".   blocksize: 32 ... 4096 (64 default).
        quant_storage: dtype the packed bytes are viewed as (uint8 default; bf16/fp16/fp32 for FSDP).
        device: where the layer lives; "meta" builds an empty layer to be filled by load_state_dict.

    The freshly built weight is nn.Linear's random init, quantized.  Shapes: input [..., in]
    (fp32/fp16/bf16) -> output [..., out] in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, quant_storage: torch.dtype = torch.uint8,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        fmt.check_quant_type(quant_type)
        fmt.check_blocksize(blocksize)
        if quant_storage not in fmt.QUANT_STORAGE_DTYPES:
            raise TypeError(f"quant_storage must be one of {fmt.QUANT_STORAGE_DTYPES}, got {quant_storage}")
        if compute_dtype is not None and compute_dtype not in fmt.FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.quant_storage = quant_storage
        w = self.weight.detach()
        if w.device.type == "meta":
            qs = _placeholder_state((out_features, in_features), blocksize, compress_statistics, quant_type,
                                    w.dtype, w.device)
            nbytes = fmt.packed_nbytes(in_features * out_features)
            packed = torch.empty((nbytes // torch.empty((), dtype=quant_storage).element_size(), 1),
                                 dtype=quant_storage, device=w.device)
            self._set_packed(packed, qs, replace=True)
        else:
            self._quantize_from(w, replace=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compress_statistics: bool = True,
                    quant_type: str = "nf4", compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                    quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (weight [out, in], fp32/fp16/bf16) into a new Linear4bit on
        the same device.  The bias is kept as is (shared with `linear`, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, Linear4bit):
            raise TypeError("the layer is already a Linear4bit")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=compress_statistics, quant_type=quant_type,
                    blocksize=blocksize, quant_storage=quant_storage, device="meta")
        if not linear.weight.is_meta:  # a meta layer (no values yet) stays an empty one, for load_state_dict
            layer._quantize_from(linear.weight.detach(), replace=True)
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def _quantize_from(self, w: torch.Tensor, replace: bool) -> None:
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must be [{self.out_features}, {self.in_features}], got {tuple(w.shape)}")
        packed, qs = quantize_4bit(w.contiguous(), blocksize=self.blocksize,
                                   compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                                   quant_storage=self.quant_storage)
        self._set_packed(packed, qs, replace)

    def _set_packed(self, packed: torch.Tensor, qs: QuantState, replace: bool) -> None:
        old = self._parameters.get("weight")
        if replace or not isinstance(old, nn.Parameter) or old.device != packed.device or old.is_meta:
            self.weight = nn.Parameter(packed, requires_grad=False)
        else:  # keep the Parameter object (optimizers, hooks and tied references see the new data)
            self.weight.data = packed
            self.weight.requires_grad_(False)
        self.quant_state = qs
        self.weight.quant_state = qs  # bitsandbytes' place for it (Params4bit.quant_state)

    # ------------------------------------------------------------------ compute
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: matmul_4bit(x.to(compute_dtype)) + bias, cast back to x.dtype
        (as bitsandbytes).  Inside ``torch.autocast`` the matmul runs in, and returns, the
        autocast dtype, as ``nn.Linear`` does."""
        return self._forward_4bit(x, None, None, 0.0)

    def _forward_4bit(self, x: torch.Tensor, lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                      scale: float) -> torch.Tensor:
        _check_layer_input(x, self.in_features)
        in_dtype = x.dtype
        cdt = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(cdt)
        xc = x.to(cdt)
        self._check_operands(xc, bias, lora_A, lora_B)
        y = _matmul_4bit(xc, self.weight, self.quant_state, bias, lora_A, lora_B, scale)
        if autocast_dtype(x.device.type) is not None:
            return y  # under autocast the matmul's dtype is autocast's, as for nn.Linear
        return y.to(in_dtype)

    def _check_operands(self, xc: torch.Tensor, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                        lora_B: Optional[torch.Tensor]) -> None:
        """The functional API's checks on this call's operands (a state, weight or bias changed after
        construction, a layer still on the meta device): the kernels trust what they are given.
        The full check (~10-20 us of Python) runs when anything it looked at has changed since the
        last call that passed it; a decode step calls every layer once per token.  Compared by
        identity (the objects are held, so an id cannot be reused) and, for tensors whose storage
        can be swapped under the same object (Module.to moves parameters that way), by data pointer
        and shape: ~5 us where the full check takes ~18 (on this project's 2-core VM)."""
        qs = self.quant_state
        params = self._parameters  # not self.weight: Module.__getattr__ costs a microsecond a name
        w, b = params["weight"], params.get("bias")
        s2 = qs.state2
        objs = (qs, qs.absmax, qs.code, qs.offset, s2, None if s2 is None else s2.absmax, w, b, lora_A, lora_B)
        key = (tuple(map(id, objs)), qs.shape, qs.blocksize, qs.quant_type, qs.dtype, w.data_ptr(), w.shape,
               xc.device, None if b is None else (b.data_ptr(), b.shape),
               None if lora_A is None else (lora_A.data_ptr(), lora_A.shape),
               None if lora_B is None else (lora_B.data_ptr(), lora_B.shape))
        compiling = torch.compiler.is_compiling()  # traced once: check in full, remember nothing
        seen = self.__dict__.get("_checked_operands")
        if not compiling and seen is not None and seen[0] == key:
            return
        check_matmul_args(xc, w, qs, bias, lora_A, lora_B)
        if not compiling:
            self.__dict__["_checked_operands"] = (key, objs)  # objs held: their ids cannot be reused

    def _put_weight_back(self, w: nn.Parameter) -> None:
        # "weight" first again: state_dict key order is part of the bitsandbytes format
        rest = [(k, self._parameters.pop(k)) for k in list(self._parameters)]
        self._parameters["weight"] = w
        for k, v in rest:
            self._parameters[k] = v

    # ------------------------------------------------------------------ device moves
    def _apply(self, fn: Any, recurse: bool = True) -> "Linear4bit":
        # The packed weight and its state only ever change device: a float cast
        # (model.half(), model.to(bf16)) must not touch the packed bytes (even when they are
        # stored as bf16 for FSDP) nor the fp32 absmax.
        w = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._put_weight_back(w)
        raw = fmt.packed_as_bytes(w.data)
        moved = fn(raw)
        if isinstance(moved, torch.Tensor) and moved.dtype == torch.uint8 and moved.device != raw.device:
            storage = w.dtype
            new = (moved if storage == torch.uint8 else moved.view(storage)).reshape(w.shape)
            if raw.is_meta or moved.is_meta:  # set_data cannot cross the meta device: a new Parameter
                w = nn.Parameter(new, requires_grad=False)
                self._parameters["weight"] = w
            else:
                w.data = new
            if raw.is_meta:  # to_empty(): the state has no values to copy either (load_state_dict fills it)
                qs = self.quant_state
                self.quant_state = _placeholder_state(tuple(qs.shape), qs.blocksize, qs.nested, qs.quant_type,
                                                      qs.dtype, moved.device)
            else:
                self.quant_state.to(moved.device)
            w.quant_state = self.quant_state
        return self

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{k}"] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        wkey = prefix + "weight"
        qs_prefix = wkey + "."
        qs_items = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        rest = {k: v for k, v in state_dict.items() if k != wkey and not k.startswith(qs_prefix)}
        # nn.Linear's loader handles the bias (and reports stray keys); the weight is ours.
        w_param = self._parameters.pop("weight")
        if self.bias is not None and self.bias.is_meta:  # a meta-built layer takes the tensors as they come
            local_metadata = {**local_metadata, "assign_to_params_buffers": True}
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._put_weight_back(w_param)
        if wkey not in state_dict:
            if strict:
                missing_keys.append(wkey)
            return
        w = state_dict[wkey]
        target = w_param.device if w_param.device.type != "meta" else w.device
        try:
            if qs_items:
                qs = QuantState.from_dict(qs_items, device=target)
                if tuple(qs.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"quant_state shape {tuple(qs.shape)} does not match the layer "
                                     f"[{self.out_features}, {self.in_features}]")
                packed = w.detach().to(target).contiguous()
                qs.validate(packed)
                if packed.dim() == 1:
                    packed = packed.unsqueeze(1)
                self.blocksize, self.quant_type = qs.blocksize, qs.quant_type
                self.compress_statistics = qs.nested
                self.quant_storage = packed.dtype
                self._set_packed(packed, qs, replace=False)
            elif w.dtype in fmt.FLOAT_DTYPES:
                # A float checkpoint: quantize it with this layer's settings.
                self._quantize_from(w.detach().to(target), replace=False)
            else:
                raise ValueError(f"{wkey} is a packed {w.dtype} tensor but the state dict has no "
                                 f"{qs_prefix}quant_state.bitsandbytes__* entries")
        except (ValueError, TypeError) as e:
            error_msgs.append(f"While loading {wkey}: {e}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.compress_statistics}, compute_dtype={self.compute_dtype}")


class LoRALinear4bit(nn.Module):
    """A Linear4bit base with a trainable low-rank adapter (QLoRA), in PEFT's layout.

    ``y = base(x) + scaling · lora_B(lora_A(dropout(x)))`` with ``lora_A``/``lora_B`` bias-free
    ``nn.Linear`` [r, in] / [out, r] under ``ModuleDict`` key ``"default"`` (PEFT's adapter
    name), A Kaiming-uniform (a = √5), B zero, ``scaling = α / r`` (``α / √r`` with rsLoRA).
    Without dropout the whole expression is one fused op; with dropout the LoRA branch runs on
    the dropped input in torch (dropout applies to the LoRA input only).
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: Linear4bit, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default",
                 lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base_layer, Linear4bit):
            raise TypeError(f"base_layer must be a nf4kit Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disable_adapters = False
        self.merged = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    use_rslora: bool = False, compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                    blocksize: int = 64, compress_statistics: bool = True, quant_type: str = "nf4",
                    lora_dtype: torch.dtype = torch.float32) -> "LoRALinear4bit":
        """Quantize `linear` (or wrap it, if it is already a Linear4bit) and attach a fresh adapter."""
        if isinstance(linear, Linear4bit):
            base = linear
            if compute_dtype is not None:
                base.compute_dtype = compute_dtype
        else:
            base = Linear4bit.from_linear(linear, blocksize=blocksize, compress_statistics=compress_statistics,
                                          quant_type=quant_type, compute_dtype=compute_dtype)
        return cls(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   lora_dtype=lora_dtype)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32) -> None:
        """Add (or re-initialise) adapter `adapter_name` (PEFT's method name)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        _finite_number(lora_alpha, "lora_alpha")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        dev = self.base_layer.weight.device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=lora_dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=lora_dtype)
        self.reset_lora_parameters(adapter_name)

    def reset_lora_parameters(self, adapter_name: str = "default") -> None:
        """A ~ Kaiming-uniform(a=√5) (nn.Linear's default), B = 0: the adapter starts as a no-op."""
        if self.lora_A[adapter_name].weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    # ------------------------------------------------------------------ PEFT-like API
    @property
    def weight(self) -> nn.Parameter:
        """The base layer's packed weight (PEFT layers expose it the same way)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.base_layer.bias

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the adapter on (True) or off (False); off, the layer is its 4-bit base."""
        self._disable_adapters = not enabled

    def disable_adapter(self) -> None:
        self.enable_adapters(False)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.lora_A)}")
        self.active_adapter = adapter_name

    def get_delta_weight(self, adapter_name: Optional[str] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = scaling · B·A, [out, in] in `dtype` (computed in fp32)."""
        name = adapter_name or self.active_adapter
        A = self.lora_A[name].weight.detach().float()
        B = self.lora_B[name].weight.detach().float()
        return (self.scaling[name] * (B @ A)).to(dtype)

    @torch.no_grad()
    def merge_and_dequantize(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + ΔW (the adapter folded in, no re-quantization).

        dtype: default the base layer's compute dtype (else the dtype W was quantized from).
        """
        base = self.base_layer
        dtype = dtype or base.compute_dtype or base.quant_state.dtype
        W = base.dequantize(torch.float32)
        if not self._disable_adapters:
            W = W + self.get_delta_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=W.device, dtype=dtype)
        out.weight.copy_(W.to(dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias.to(dtype))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        name = self.active_adapter
        if self._disable_adapters or name not in self.lora_A:
            return self.base_layer(x)
        A = self.lora_A[name].weight
        B = self.lora_B[name].weight
        s = _finite_number(self.scaling[name], "LoRA scaling")
        drop = self.lora_dropout[name]
        if isinstance(drop, nn.Identity) or not self.training or drop.p == 0:
            return self.base_layer._forward_4bit(x, A, B, s)
        # Dropout on the LoRA input only: base through the fused op, LoRA branch in torch.
        base = self.base_layer
        check_lora(A, B, self.out_features, self.in_features)  # the fused path checks it in _check_operands
        y = base._forward_4bit(x, None, None, 0.0)
        cdt = autocast_dtype(x.device.type) or base._compute_dtype(x)
        xd = drop(x.to(cdt))
        lora = nn.functional.linear(nn.functional.linear(xd, A.to(cdt)), B.to(cdt)) * s
        return y + lora.to(y.dtype)

    def extra_repr(self) -> str:
        name = self.active_adapter
        return f"r={self.r.get(name)}, lora_alpha={self.lora_alpha.get(name)}, scaling={self.scaling.get(name)}"


# ---------------------------------------------------------------------- model surgery
@dataclass
class LoraConfig:
    """LoRA settings for :func:`quantize_model` (a subset of PEFT's LoraConfig, same names).

    r: rank.  lora_alpha: α (scaling α/r, or α/√r with use_rslora).  lora_dropout: dropout
    probability on the LoRA input.  lora_dtype: dtype of the A and B matrices (fp32 default,
    as PEFT keeps adapters).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    use_rslora: bool = False
    lora_dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)


def _matches(name: str, patterns: Union[str, Sequence[str], None]) -> bool:
    """PEFT's matching: a string is a regex (full match); a list matches a name or its suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _convertible(model: nn.Module, name: str, mod: nn.Linear) -> bool:
    """Whether a Linear4bit computes what `mod` computes: an nn.Linear (or a subclass that keeps its
    forward) that its parent does not read by weight (nn.MultiheadAttention's out_proj: its
    parent calls F.multi_head_attention_forward with out_proj.weight itself)."""
    if type(mod).forward is not nn.Linear.forward:
        return False
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return not isinstance(parent, nn.MultiheadAttention)


def _target_names(model: nn.Module, target_modules: Union[str, Sequence[str]],
                  skip_modules: Iterable[str]) -> list[str]:
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"quantize_model: target_modules {target_modules!r} is not a valid regex: {e}") from e
    elif not isinstance(target_modules, Iterable) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"quantize_model: target_modules must be 'all-linear', a regex or a list of names, "
                        f"got {target_modules!r}")
    skip = tuple(skip_modules or ())
    out, left = [], []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, (Linear4bit, LoRALinear4bit)):
            continue
        if not isinstance(mod, nn.Linear):
            continue
        if any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip):
            continue
        if target_modules == "all-linear" or _matches(name, target_modules):
            # a module inside an already-converted LoRA layer (its lora_A/B) is not a target
            if ".lora_A." in name or ".lora_B." in name:
                continue
            if not _convertible(model, name, mod):
                if target_modules != "all-linear":  # asked for by name: say why it cannot be done
                    raise ValueError(f"quantize_model: {name} ({type(mod).__name__}) overrides nn.Linear's forward "
                                     f"or is read by weight by its parent; a Linear4bit would change what it computes")
                left.append(name)
                continue
            if mod.weight.dtype not in fmt.FLOAT_DTYPES:
                raise TypeError(f"quantize_model: {name} has a {mod.weight.dtype} weight; 4-bit quantization takes "
                                f"float32, float16 or bfloat16 (nothing has been converted)")
            out.append(name)
    if left:
        warnings.warn(f"quantize_model: left {len(left)} nn.Linear subclass(es) in full precision, whose forward or "
                      f"parent reads more than nn.Linear's: {left[:5]}{' ...' if len(left) > 5 else ''}", stacklevel=3)
    return out


def quantize_model(model: nn.Module, target_modules: Union[str, Sequence[str]] = "all-linear",
                   skip_modules: Iterable[str] = ("lm_head",), lora: Optional[LoraConfig] = None,
                   compute_dtype: Optional[torch.dtype] = torch.bfloat16, blocksize: int = 64,
                   compress_statistics: bool = True, quant_type: str = "nf4", progress: bool = True,
                   freeze_base: bool = True) -> nn.Module:
    """Replace the model's linear layers by 4-bit ones, in place; returns `model`.

    target_modules: "all-linear" (every ``nn.Linear`` not in skip_modules), a list of module
    names or name suffixes (``["q_proj", "v_proj"]``), or a regex matched against full names.
    skip_modules: names (or last name components) left in full precision (lm_head by default).
    lora: a :class:`LoraConfig` attaches a fresh adapter to each (LoRALinear4bit) and, with
    freeze_base, freezes every other parameter — the QLoRA set-up; None: plain Linear4bit.
    compute_dtype: the matmul dtype of the new layers (None: the input's dtype).
    Subclasses of nn.Linear that override forward, and nn.MultiheadAttention's out_proj (its parent
    reads the weight itself), are left in full precision with a warning, or refused when named in
    target_modules.  Every target is checked before the first one is converted.
    """
    names = _target_names(model, target_modules, skip_modules)
    if not names:
        raise ValueError(f"quantize_model: no nn.Linear matched target_modules={target_modules!r}")
    it: Iterable[str] = names
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(names, desc="nf4kit: quantizing", unit="layer")
        except ImportError:  # pragma: no cover
            pass
    for name in it:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        q = Linear4bit.from_linear(linear, blocksize=blocksize, compress_statistics=compress_statistics,
                                   quant_type=quant_type, compute_dtype=compute_dtype)
        if lora is not None:
            q = LoRALinear4bit(q, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                               use_rslora=lora.use_rslora, lora_dtype=lora.lora_dtype)
        setattr(parent, child, q)
        del linear
    if lora is not None and freeze_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every LoRA matrix in `model` (PEFT naming, with the adapter key)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
