"""PEFT integration: nf4kit's fused 4-bit LoRA layer as PEFT's LoRA layer for 4-bit bases.

PEFT (>= 0.13) lets a ``LoraConfig`` map a base-layer type to a custom LoRA layer class
(``LoraConfig._register_custom_module``); custom mappings are tried before PEFT's own.
This module maps both ``nf4kit.nn.Linear4bit`` and ``bitsandbytes.nn.Linear4bit`` to
:class:`FusedLoraLinear4bit`, whose forward is one nf4kit op
``y = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias`` (dequantization inside the matmul, LoRA folded in).

    import nf4kit.integrations.peft            # registers (enable()); disable() undoes it
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=16))

`enable()` patches ``LoraConfig.__post_init__`` so every plain-LoRA config built afterwards
(including the one ``PeftModel.from_pretrained`` reads from ``adapter_config.json``) carries
the mapping; `register(config)` adds it to one config.  Configs that ask for a LoRA variant
(DoRA, aLoRA, Arrow, ...) or a data-dependent init (PiSSA, OLoRA, LoftQ, EVA, ...) are left to
PEFT's own layers.

The layer keeps PEFT's names (``base_layer``, ``lora_A``/``lora_B`` ModuleDicts of bias-free
``nn.Linear``, ``scaling``, ``lora_dropout``), so adapters saved with it are ordinary PEFT
adapters that load on stock PEFT + bitsandbytes, and the reverse.  ``merge`` folds the
adapters into a dense copy of the base weight (no re-quantization): ``merge_and_unload()``
returns a model with plain ``nn.Linear`` layers in the dtype the weights were quantized from
(or ``merge_dtype``); ``unmerge`` restores the original 4-bit layer bit for bit.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

try:
    from peft import LoraConfig
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as e:  # pragma: no cover - peft is an optional dependency
    raise ImportError("nf4kit.integrations.peft needs `peft` (pip install peft)") from e

from .. import nn as nf4nn
from ..autograd import matmul_4bit as _matmul_4bit
from ..format import QuantState
from ..ops import autocast_dtype

ENV_VAR = "NF4KIT_PEFT"
# Forwards served, by path: "fused" (one nf4kit op with the LoRA term), "split" (nf4kit base
# op + LoRA in torch: dropout in training, several adapters, lora_bias) and "base" (no adapter).
call_counts: collections.Counter = collections.Counter()

_PLAIN_INITS = (True, False, "gaussian")


# ---------------------------------------------------------------- base-layer access
def _is_bnb_linear4bit(layer: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def nf4kit_state_from_bnb(bqs: Any) -> QuantState:
    """An nf4kit QuantState sharing the tensors of a bitsandbytes QuantState (no copies).

    The offset is always fp32 (bitsandbytes may hold a bf16 one, which gives NaNs).
    """
    if bqs.nested:
        s2 = QuantState(absmax=bqs.state2.absmax, code=bqs.state2.code, blocksize=bqs.state2.blocksize,
                        dtype=torch.float32)
        offset = bqs.offset if bqs.offset.dtype == torch.float32 else bqs.offset.float()
        return QuantState(absmax=bqs.absmax, shape=bqs.shape, code=bqs.code, blocksize=bqs.blocksize,
                          quant_type=bqs.quant_type, dtype=bqs.dtype, offset=offset.reshape(()), state2=s2)
    return QuantState(absmax=bqs.absmax, shape=bqs.shape, code=bqs.code, blocksize=bqs.blocksize,
                      quant_type=bqs.quant_type, dtype=bqs.dtype)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The data of a (Params4bit) parameter as a plain tensor."""
    d = t.data
    return d.as_subclass(torch.Tensor) if type(d) is not torch.Tensor else d


def _base_4bit(base: nn.Module) -> Optional[tuple[torch.Tensor, QuantState, Optional[torch.dtype]]]:
    """(packed, nf4kit QuantState, compute_dtype) of a 4-bit base layer, None if it cannot
    run through nf4kit (bitsandbytes' repacked CPU inference layout, or no state yet)."""
    if isinstance(base, nf4nn.Linear4bit):
        return base.weight, base.quant_state, base.compute_dtype
    if _is_bnb_linear4bit(base):
        bqs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if bqs is None or getattr(bqs, "packing_format_for_cpu", False):
            return None
        packed, qs = _plain(base.weight), nf4kit_state_from_bnb(bqs)
        qs.validate(packed)  # bitsandbytes' state, checked before any kernel reads it
        return packed, qs, base.compute_dtype
    return None


def _dequantized(base: nn.Module) -> torch.Tensor:
    """The float weight [out, in] (fp32) of a 4-bit base layer."""
    from ..functional import dequantize_4bit

    if isinstance(base, nf4nn.Linear4bit):
        return base.dequantize(torch.float32)
    if _is_bnb_linear4bit(base):
        import bitsandbytes.functional as BF

        w = base.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # bitsandbytes' CPU layout: undo it
            w.data, w.quant_state = BF._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return dequantize_4bit(_plain(w), nf4kit_state_from_bnb(w.quant_state), dtype=torch.float32)
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    raise TypeError(f"unsupported base layer {type(base).__name__}")


# ---------------------------------------------------------------- the layer
class FusedLoraLinear4bit(nn.Module, LoraLayer):
    """PEFT LoRA layer over a 4-bit base (nf4kit or bitsandbytes ``Linear4bit``).

    Forward, x [..., in] (fp32/fp16/bf16) -> [..., out] in x.dtype: the input is cast to the
    base's compute dtype (as bitsandbytes does) and one fused nf4kit op computes the base
    matmul, the bias and the first active adapter's LoRA term; further adapters, a LoRA
    input dropout in training, or ``lora_bias`` add their terms in torch.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self.merge_dtype: Optional[torch.dtype] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # PEFT resolves LoRA variants (DoRA...) through this; the fused layer serves plain LoRA.
    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        if not is_plain_lora(config):
            raise ValueError("nf4kit's fused LoRA layer serves plain LoRA only (no DoRA/aLoRA/Arrow/... and "
                             "init_lora_weights in True/False/'gaussian'); use a config without "
                             "nf4kit.integrations.peft.register() for these")
        return None

    # ------------------------------------------------------------ forward
    def _compute_dtype(self, x: torch.Tensor, cdt: Optional[torch.dtype]) -> torch.dtype:
        amp_dtype = autocast_dtype(x.device.type)
        if amp_dtype is not None:
            return amp_dtype
        return cdt if cdt is not None else x.dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            call_counts["base"] += 1
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            call_counts["base"] += 1
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)

        active = [a for a in self.active_adapters if a in self.lora_A]
        base = self.get_base_layer()
        got = _base_4bit(base)
        if got is None:  # not a layout nf4kit reads: base layer as is, LoRA in torch
            call_counts["split"] += 1
            return self._add_lora(self.base_layer(x, *args, **kwargs), x, active)
        packed, qs, cdt = got
        in_dtype = x.dtype
        cdt = self._compute_dtype(x, cdt)
        xc = x.to(cdt)
        bias = None if base.bias is None else base.bias.to(cdt)
        fused = next((a for a in active if self._fusable(a)), None)
        if fused is None:
            y = _matmul_4bit(xc, packed, qs, bias, None, None, 0.0)
            call_counts["split" if active else "base"] += 1
        else:
            y = _matmul_4bit(xc, packed, qs, bias, self.lora_A[fused].weight, self.lora_B[fused].weight,
                             float(self.scaling[fused]))
            call_counts["fused"] += 1
            if self.lora_bias.get(fused, False):
                y = y + (self.scaling[fused] * self.lora_B[fused].bias).to(y.dtype)
        y = self._add_lora(y, x, [a for a in active if a != fused])
        if autocast_dtype(x.device.type) is None:
            y = y.to(in_dtype)
        return y

    def _fusable(self, adapter: str) -> bool:
        drop = self.lora_dropout[adapter]
        return isinstance(drop, nn.Identity) or not self.training or getattr(drop, "p", 0.0) == 0.0

    def _add_lora(self, result: torch.Tensor, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """result + Σ scaling·B(A(dropout(x))), each term in the LoRA weights' dtype (as PEFT)."""
        for a in adapters:
            A, B = self.lora_A[a], self.lora_B[a]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            result = result + (B(A(self.lora_dropout[a](xa))) * self.scaling[a]).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str],
                             **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        call_counts["split"] += 1
        for a in set(adapter_names):
            if a == "__base__" or a not in self.lora_A:
                continue
            idx = [i for i, n in enumerate(adapter_names) if n == a]
            result[idx] = self._add_lora(result[idx], x[idx], [a])
        return result

    # ------------------------------------------------------------ merge
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = scaling · B·A, [out, in], in the LoRA weights' dtype."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into a dense copy of the base: the base becomes an ``nn.Linear`` in
        ``merge_dtype`` (default: the dtype the weight was quantized from).  The 4-bit layer is
        kept aside and comes back unchanged on ``unmerge``."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if "_nf4kit_quantized_base" not in self.__dict__:
            dense = self._dense_copy(base)
            # outside the module tree: not a submodule, not in the state dict
            object.__setattr__(self, "_nf4kit_quantized_base", base)
            self.base_layer = dense
            base = dense
        for a in adapter_names:
            if a not in self.lora_A:
                continue
            w = base.weight.data.float() + self.get_delta_weight(a).detach().float()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {a} seems to be broken")
            base.weight.data = w.to(base.weight.dtype)
            if self.lora_bias.get(a, False):
                base.bias.data = (base.bias.data.float()
                                  + self.scaling[a] * self.lora_B[a].bias.detach().float()).to(base.bias.dtype)
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if a not in self.lora_A:
                continue
            base = self.get_base_layer()
            base.weight.data = (base.weight.data.float() - self.get_delta_weight(a).detach().float()).to(
                base.weight.dtype)
            if self.lora_bias.get(a, False):
                base.bias.data -= (self.scaling[a] * self.lora_B[a].bias.detach()).to(base.bias.dtype)
        q = self.__dict__.pop("_nf4kit_quantized_base", None)
        if q is not None:  # the original 4-bit layer, exactly
            dev = self.get_base_layer().weight.device
            self.base_layer = q.to(dev) if q.weight.device != dev else q

    def _dense_copy(self, base: nn.Module) -> nn.Linear:
        got = _base_4bit(base)
        qdtype = got[1].dtype if got is not None else getattr(getattr(base.weight, "quant_state", None), "dtype",
                                                              None)
        dtype = self.merge_dtype or qdtype or torch.float32
        W = _dequantized(base)
        dense = nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device=W.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(W.to(dtype))
            if base.bias is not None:
                dense.bias.copy_(base.bias.detach().to(dtype))
        dense.weight.requires_grad_(False)
        if dense.bias is not None:
            dense.bias.requires_grad_(False)
        return dense

    def __repr__(self) -> str:
        return "nf4kit." + super().__repr__()


# ---------------------------------------------------------------- registration
def is_plain_lora(config: LoraConfig) -> bool:
    """True if `config` asks for vanilla LoRA (what the fused layer computes)."""
    for f in dataclasses.fields(config):
        if f.metadata.get("is_lora_variant") and getattr(config, f.name, None):
            return False
    for name in ("use_dora", "alora_invocation_tokens", "arrow_config", "velora_config", "use_bdlora"):
        if getattr(config, name, None):
            return False
    init = config.init_lora_weights
    return any(init is v or init == v for v in _PLAIN_INITS) and not getattr(config, "fan_in_fan_out", False)


def custom_module_mapping() -> dict[type, type]:
    """{4-bit base layer type: FusedLoraLinear4bit} for every 4-bit layer type importable here."""
    mapping: dict[type, type] = {nf4nn.Linear4bit: FusedLoraLinear4bit}
    try:
        import bitsandbytes as bnb

        mapping[bnb.nn.Linear4bit] = FusedLoraLinear4bit
    except Exception:  # noqa: BLE001 - bitsandbytes is optional
        pass
    return mapping


def register(config: LoraConfig) -> LoraConfig:
    """Route this config's 4-bit targets to the fused layer; returns the config."""
    if not is_plain_lora(config):
        raise ValueError("nf4kit's fused LoRA layer serves plain LoRA only (no DoRA/aLoRA/Arrow, "
                         "init_lora_weights True/False/'gaussian')")
    config._register_custom_module(custom_module_mapping())
    return config


_original_post_init = None


def enable() -> None:
    """Every plain-LoRA ``LoraConfig`` created from now on routes 4-bit layers to the fused layer."""
    global _original_post_init
    if _original_post_init is not None:
        return
    orig = LoraConfig.__post_init__

    def __post_init__(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        if is_plain_lora(self):
            self._register_custom_module(custom_module_mapping())

    LoraConfig.__post_init__ = __post_init__
    _original_post_init = orig


def disable() -> None:
    """Undo `enable()`: configs created afterwards use PEFT's own layers (bitsandbytes' LoRA...)."""
    global _original_post_init
    if _original_post_init is not None:
        LoraConfig.__post_init__ = _original_post_init
        _original_post_init = None


def is_enabled() -> bool:
    return _original_post_init is not None


if os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no"):
    enable()
