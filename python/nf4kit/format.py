"""The bitsandbytes 4-bit format: code tables, the 8-bit dynamic map, QuantState and its
(de)serialisation, and validation of a state against its packed data.

Everything here is bit-compatible with bitsandbytes 0.50 (see ../shared/DESIGN.md §3).
The same constants live in csrc/core/nf4_core.h as hex literals; tests check they agree.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# NF4: normal-quantile code, as bitsandbytes' get_4bit_type("nf4") (fp32 values).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (e2m1 with bitsandbytes' bias): [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12, codes 8-15 negated
# (code 8 is +0.0 in bitsandbytes' table).
_FP4_NUMERATORS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# Value-sorted position -> code for FP4 (bitsandbytes' argsort of its table; the two zeros
# keep code order).  NF4 is already sorted.
FP4_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def _fp4_values() -> torch.Tensor:
    t = torch.tensor(_FP4_NUMERATORS + tuple(-v if v else 0.0 for v in _FP4_NUMERATORS), dtype=torch.float32)
    return t / torch.tensor(12.0)


_TABLES = {"nf4": torch.tensor(NF4_VALUES, dtype=torch.float32), "fp4": _fp4_values()}


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def code_table(quant_type: str, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The 16-entry code -> value table, fp32 [16] (bitsandbytes' `quant_map`)."""
    return _TABLES[check_quant_type(quant_type)].to(device) if device is not None else _TABLES[quant_type].clone()


def quant_thresholds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints fp32 [15], sorted position -> code int64 [16]).

    code = sorted_codes[number of midpoints strictly below xn] (ties go to the lower value).
    """
    table = _TABLES[check_quant_type(quant_type)]
    order = torch.tensor(FP4_SORTED_CODES if quant_type == "fp4" else tuple(range(16)), dtype=torch.int64)
    s = table[order]
    return (s[:-1] + s[1:]) / 2, order


def zero_code(quant_type: str) -> int:
    """The code of 0.0: fills all-zero blocks and the pad nibble of an odd count."""
    return 7 if check_quant_type(quant_type) == "nf4" else 0


_DYNAMIC_MAP: Optional[torch.Tensor] = None


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)), fp32 [256].

    For exponent i in 0..6: the 2^i midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6),
    both signs; plus 0 and 1.0; sorted.
    """
    global _DYNAMIC_MAP
    if _DYNAMIC_MAP is None:
        values: list[float] = []
        for i in range(7):
            edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            scale = 10.0 ** (i - 6)
            values += (mids * scale).tolist()
            values += (mids * -scale).tolist()
        values += [0.0, 1.0]
        _DYNAMIC_MAP = torch.tensor(sorted(values), dtype=torch.float32)
    return _DYNAMIC_MAP.clone()


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def packed_nbytes(n: int) -> int:
    """Bytes of packed codes for n elements (two per byte, odd count padded)."""
    return (n + 1) // 2


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: Any) -> torch.dtype:
    for dt, nm in _DTYPE_NAMES.items():
        if name == nm:
            return dt
    raise ValueError(f"quant_state dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {name!r}")


class QuantState:
    """Quantization state of a 4-bit tensor, with bitsandbytes' fields and behaviour.

    absmax: fp32 [nblocks], or uint8 [nblocks] when nested (double quant).
    shape: torch.Size of the original tensor.  code: fp32 [16] table.  dtype: original dtype.
    offset: fp32 0-d tensor (nested only).  state2: the nested QuantState (absmax fp32
    [ceil(nblocks/256)], code fp32 [256] dynamic map, blocksize 256, dtype float32).
    """

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in QUANT_TYPES]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
        "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Optional[torch.Size] = None,
        code: Optional[torch.Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[torch.Tensor] = None,
        state2: Optional["QuantState"] = None,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    # bitsandbytes compatibility: qs.bitsandbytes__nf4 -> the packed JSON tensor
    def __getattr__(self, name: str) -> Any:
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' serialisation.  packed=True: tensors only, non-tensor fields as
        the uint8 JSON tensor under ``quant_state.bitsandbytes__<quant_type>``."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset.item()),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = pack_json(others)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of as_dict (packed or not), keys optionally prefixed (``weight.absmax``).

        Raises ValueError on a missing, unknown or malformed entry.
        """
        if not isinstance(qs_dict, dict):
            raise TypeError(f"quant_state: from_dict needs a dict of entries, got {type(qs_dict).__name__}")
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in {k.split(".")[-1] for k in qs_dict}:
            if not packed_keys:
                raise ValueError("quant_state: expected the packed 'quant_state.bitsandbytes__nf4|fp4' entry "
                                 "or unpacked fields, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(f"quant_state: need exactly one entry ending in one of {cls.valid_qs_type_keys}, "
                                 f"found {packed_keys}")
        if len(packed_keys) == 1:
            key = packed_keys[0]
            meta = unpack_json(qs_dict.pop(key))
            suffix = key.split(".")[-1].replace("bitsandbytes__", "")
            if meta.get("quant_type") != suffix:
                raise ValueError(f"quant_state: the key says quant_type {suffix!r} but its JSON says {meta.get('quant_type')!r}")
            qs_dict.update(meta)
        d = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(d) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"quant_state: unknown entries {sorted(unknown)}")
        for req in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if req not in d:
                raise ValueError(f"quant_state: missing {req!r}")
        quant_type = check_quant_type(d["quant_type"])
        blocksize = _as_int(d["blocksize"], "blocksize")
        check_blocksize(blocksize)
        shape = d["shape"]
        if not isinstance(shape, (list, tuple, torch.Size)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"quant_state: shape must be a list of non-negative ints, got {shape!r}")
        for k in ("absmax", "quant_map"):
            if not isinstance(d[k], torch.Tensor):
                raise ValueError(f"quant_state: {k!r} must be a tensor, got {type(d[k]).__name__}")
        nested_keys = {"nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"}
        present = nested_keys & set(d)
        state2 = offset = None
        if present:
            if present != nested_keys:
                raise ValueError(f"quant_state: incomplete double-quant entries, missing {sorted(nested_keys - present)}")
            try:
                off = float(d["nested_offset"])
            except (TypeError, ValueError):
                raise ValueError(f"quant_state: nested_offset must be a number, got {d['nested_offset']!r}") from None
            if not math.isfinite(off):
                raise ValueError(f"quant_state: nested_offset is not finite ({off})")
            # Always fp32, whatever it was stored as (bitsandbytes' bf16 offset gives NaNs).
            offset = torch.tensor(off, dtype=torch.float32, device=device)
            nb = _as_int(d["nested_blocksize"], "nested_blocksize")
            state2 = cls(
                absmax=_as_tensor(d["nested_absmax"], "nested_absmax").to(device=device, dtype=torch.float32),
                blocksize=nb,
                code=_as_tensor(d["nested_quant_map"], "nested_quant_map").to(device=device, dtype=torch.float32),
                dtype=dtype_from_name(d["nested_dtype"]),
            )
        absmax = d["absmax"].to(device)
        if state2 is None and absmax.dtype != torch.float32:
            if not absmax.dtype.is_floating_point:
                raise ValueError(f"quant_state: absmax must be floating point without double quant, got {absmax.dtype}")
            absmax = absmax.float()
        qs = cls(
            absmax=absmax,
            shape=torch.Size(shape),
            code=d["quant_map"].to(device=device, dtype=torch.float32),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype_from_name(d["dtype"]),
            offset=offset,
            state2=state2,
        )
        qs.validate(check_values=True)
        return qs

    def to(self, device: torch.device | str) -> "QuantState":
        """Moves every tensor to `device` in place (as bitsandbytes) and returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def clone(self) -> "QuantState":
        s2 = None
        if self.nested:
            s2 = QuantState(self.state2.absmax.clone(), code=self.state2.code.clone(),
                            blocksize=self.state2.blocksize, dtype=self.state2.dtype)
        return QuantState(self.absmax.clone(), self.shape, None if self.code is None else self.code.clone(),
                          self.blocksize, self.quant_type, self.dtype,
                          None if self.offset is None else self.offset.clone(), s2)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return False

        def same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))

        return (same(self.absmax, other.absmax) and self.shape == other.shape and same(self.code, other.code)
                and self.dtype == other.dtype and self.blocksize == other.blocksize
                and self.quant_type == other.quant_type and same(self.offset, other.offset)
                and self.nested == other.nested and (not self.nested or self.state2 == other.state2))

    __hash__ = None  # mutable, like bitsandbytes'

    def __repr__(self) -> str:
        return (f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested}, device={self.device})")

    # ------------------------------------------------------------------ validation
    def validate(self, packed: Optional[torch.Tensor] = None, check_values: bool = False) -> None:
        """Checks every field against the others and, if given, the packed data.

        Raises ValueError / TypeError naming the problem.  check_values also reads the
        tensors (a device sync on GPU): absmax finite and non-negative, tables right.
        """
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if self.shape is None:
            raise ValueError("quant_state: shape is missing")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"quant_state: shape {tuple(self.shape)} must be non-negative ints")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"quant_state: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        n = self.numel
        if n <= 0:
            raise ValueError(f"quant_state: shape {tuple(self.shape)} has no elements")
        nblocks = num_blocks(n, self.blocksize)
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError("quant_state: absmax must be a tensor")
        if self.absmax.dim() != 1:  # every backend indexes it flat
            raise ValueError(f"quant_state: absmax must be 1-D [{nblocks}], got shape {tuple(self.absmax.shape)}")
        if self.absmax.numel() != nblocks:
            raise ValueError(f"quant_state: absmax has {self.absmax.numel()} entries but shape "
                             f"{tuple(self.shape)} with blocksize {self.blocksize} needs {nblocks}")
        device = self.absmax.device
        if not isinstance(self.code, torch.Tensor) or self.code.numel() != 16:
            raise ValueError("quant_state: quant_map (code) must have 16 entries")
        tensors = {"quant_map": self.code}
        if self.nested:
            s2 = self.state2
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"quant_state: nested absmax must be uint8 codes, got {self.absmax.dtype}")
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"quant_state: nested_blocksize must be {NESTED_BLOCKSIZE}, got {s2.blocksize}")
            need2 = num_blocks(nblocks, NESTED_BLOCKSIZE)
            if not isinstance(s2.absmax, torch.Tensor) or s2.absmax.dim() != 1:
                raise ValueError(f"quant_state: nested_absmax must be a 1-D tensor [{need2}]")
            if s2.absmax.numel() != need2:
                raise ValueError(f"quant_state: nested_absmax has {s2.absmax.numel()} entries, "
                                 f"{nblocks} blocks need {need2}")
            if s2.absmax.dtype != torch.float32:
                raise TypeError(f"quant_state: nested_absmax must be float32, got {s2.absmax.dtype}")
            if s2.code is None or s2.code.numel() != 256 or s2.code.dtype != torch.float32:
                raise ValueError("quant_state: nested_quant_map must be float32 with 256 entries")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
                raise ValueError("quant_state: nested state needs a scalar offset")
            if self.offset.dtype != torch.float32:
                raise TypeError(f"quant_state: offset must be float32, got {self.offset.dtype}")
            tensors.update(nested_absmax=s2.absmax, nested_quant_map=s2.code, offset=self.offset)
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"quant_state: absmax must be float32, got {self.absmax.dtype}")
        for name, t in tensors.items():
            if t.device != device:
                raise ValueError(f"quant_state: {name} is on {t.device} but absmax is on {device}")
        if packed is not None:
            check_packed(packed, n)
            if packed.device != device:
                raise ValueError(f"packed weight is on {packed.device} but its quant_state is on {device}")
        if check_values:
            self._check_values()

    def _check_values(self) -> None:
        if not torch.equal(self.code.detach().cpu().float(), _TABLES[self.quant_type]):
            raise ValueError(f"quant_state: quant_map is not bitsandbytes' {self.quant_type} table")
        scales = self.state2.absmax if self.nested else self.absmax
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError("quant_state: absmax holds negative, NaN or Inf values")
        if self.nested:
            code2 = self.state2.code
            if not bool(torch.isfinite(code2).all()) or not bool((code2[1:] >= code2[:-1]).all()):
                raise ValueError("quant_state: nested_quant_map must be finite and sorted ascending")


def check_packed(packed: torch.Tensor, n: int) -> None:
    """The packed tensor must hold exactly (n+1)//2 bytes, in a supported storage dtype."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed weight must be a tensor, got {type(packed).__name__}")
    if packed.dtype not in QUANT_STORAGE_DTYPES:
        raise TypeError(f"packed weight dtype must be one of {QUANT_STORAGE_DTYPES}, got {packed.dtype}")
    nbytes = packed.numel() * packed.element_size()
    if nbytes != packed_nbytes(n):
        raise ValueError(f"packed weight holds {nbytes} bytes but the quant_state shape needs "
                         f"{packed_nbytes(n)} (two 4-bit codes per byte)")
    if not packed.is_contiguous():
        raise ValueError("packed weight must be contiguous")


def packed_as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 view, whatever the storage dtype."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def pack_json(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor) -> dict[str, Any]:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError("quant_state: the packed quant_state entry must be a uint8 tensor of JSON bytes")
    try:
        d = json.loads(bytes(t.detach().cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state: malformed or truncated quant_state JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError("quant_state: the quant_state JSON must be an object")
    return d


def _as_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"quant_state: {name} must be an integer, got {v!r}")
    return v


def _as_tensor(v: Any, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"quant_state: {name} must be a tensor, got {type(v).__name__}")
    return v
