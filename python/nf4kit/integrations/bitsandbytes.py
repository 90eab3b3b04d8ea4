"""nf4kit as a kernel backend for bitsandbytes (>= 0.48, tested with 0.50.2).

bitsandbytes routes its 4-bit and 8-bit block-wise work through torch.library ops in the
``bitsandbytes`` namespace (``bitsandbytes/_ops.py``) and looks up a kernel per device.
`enable()` registers nf4kit's kernels for

    bitsandbytes::quantize_4bit, dequantize_4bit (+ .out), gemv_4bit (+ .out), gemm_4bit,
    quantize_blockwise, dequantize_blockwise (+ .out)

on the CPU and CUDA dispatch keys, in a private ``torch.library.Library`` fragment, so that
`disable()` removes exactly those registrations and bitsandbytes' own kernels are back.

bitsandbytes registers its own kernels from Python too (``register_kernel`` in
``bitsandbytes/_ops.py``: CUDA ones in ``backends/cuda/ops.py`` when a GPU is there, CPU ones
in ``backends/cpu/ops.py`` when its native library loaded), so nf4kit's registration for the
same op and dispatch key is an override.  torch 2.11's ``Library.impl`` refuses that by default
(``allow_override=False``: "This is not allowed since there's already a kernel registered from
python overriding ..."), torch 2.13's allows it by default, and a torch without the flag always
refuses: `enable()` asks for the override explicitly (`_impl_override`).  The dispatcher keeps
the registrations stacked, so destroying nf4kit's fragment makes bitsandbytes' kernels the
active ones again, and torch's record of Python-registered kernels keeps theirs.

bitsandbytes calls every entry point of the ``bitsandbytes.backends`` group at the end of
``import bitsandbytes`` (after its own kernels are registered) and turns any exception into
an import error; `entry_point` therefore catches everything and only warns.  The entry point
registers the CPU kernels; ``NF4KIT_BNB_BACKEND=1`` adds CUDA (opt-in: see
`_entry_point_devices`), ``NF4KIT_BNB_BACKEND=0`` registers nothing.  `enable()` takes devices.

Schemas are honoured as bitsandbytes defines them: the packed weight ``B`` may be stored as
any dtype (viewed as uint8 bytes), ``shapeB = [N, K]``, ``gemm_4bit`` gets the double-quant
state unexpanded (``absmax`` = nested fp32 absmax, ``absmax_8bit`` uint8 codes,
``absmax_code`` fp32[256], ``absmax_offset`` fp32 0-d), other absmax are fp32.  One
deliberate difference: bitsandbytes' CPU ``quantize_blockwise`` (used for double quant)
finds codes with an approximate lookup table, nf4kit picks the exact nearest code, so a
few nested absmax codes can differ by one step from stock bitsandbytes on CPU.
"""
from __future__ import annotations

import collections
import inspect
import math
import os
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

ENV_VAR = "NF4KIT_BNB_BACKEND"
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
OPS = (
    "quantize_4bit", "dequantize_4bit", "dequantize_4bit.out", "gemv_4bit", "gemv_4bit.out", "gemm_4bit",
    "quantize_blockwise", "dequantize_blockwise", "dequantize_blockwise.out",
)

# (bitsandbytes op, device type) -> number of calls nf4kit served; tests use it to prove
# that nf4kit's kernels ran (nf4kit.backends.call_counts says which nf4kit backend ran).
call_counts: collections.Counter = collections.Counter()
_lib: Optional[torch.library.Library] = None
_devices: tuple[str, ...] = ()


# ---------------------------------------------------------------- helpers
def _as_bytes(B: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit codes as a flat uint8 tensor, whatever the storage dtype (FSDP stores bf16...)."""
    flat = B.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _count(op: str, device: torch.device) -> None:
    call_counts[(op, device.type)] += 1


def _cached_for(cache: dict, owner: torch.Tensor, key: tuple, compute: Callable[[], Any]) -> Any:
    """compute(), kept in `cache` under id(owner) for as long as `key` (what it depends on: version
    counters, data pointers) holds, and dropped when `owner` is freed."""
    hit = cache.get(id(owner))
    if hit is not None and hit[0]() is owner and hit[1] == key:
        return hit[2]
    value = compute()
    if hit is None or hit[0]() is not owner:
        weakref.finalize(owner, cache.pop, id(owner), None)
    cache[id(owner)] = (weakref.ref(owner), key, value)
    return value


# id(code) -> (weakref to code, (code version, data_ptr, device), 'nf4' / 'fp4' / None), by
# _cached_for.  bitsandbytes passes each layer's own quant_map tensor on every gemv_4bit call;
# reading it back to the host to identify it cost a device sync per call on CUDA (the M = 1 decode
# measured 117-315 us through nf4kit against 33 us stock on an H100), so it is identified once per
# tensor and version.
_table_type_cache: dict = {}


def _table_type(code: torch.Tensor) -> Optional[str]:
    """'nf4' / 'fp4' if `code` is exactly that 16-entry table, else None (read once per tensor and
    in-place change: see _table_type_cache)."""
    from .. import format as fmt

    if code.numel() != 16:
        return None

    def identify() -> Optional[str]:
        c = code.detach().reshape(-1).float().cpu()
        return next((qt for qt in fmt.QUANT_TYPES if torch.equal(c, fmt.code_table(qt))), None)

    return _cached_for(_table_type_cache, code, (code._version, code.data_ptr(), code.device), identify)


_device_tables: dict = {}


def _code_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """fmt.code_table(quant_type, device), copied to the device once (a host-to-device copy per
    call would cost a transfer on every decode step); nf4kit never writes to it."""
    from .. import format as fmt

    key = (quant_type, device)
    table = _device_tables.get(key)
    if table is None:
        table = _device_tables[key] = fmt.code_table(quant_type, device)
    return table


def _nf4kit_state(shape: Sequence[int], absmax: torch.Tensor, blocksize: int, quant_type: str,
                  dtype: torch.dtype, absmax_8bit: Optional[torch.Tensor] = None,
                  absmax_code: Optional[torch.Tensor] = None,
                  absmax_offset: Optional[torch.Tensor] = None):
    """An nf4kit QuantState over bitsandbytes' loose op arguments (no copies of fp32 data)."""
    from .. import format as fmt
    from ..format import QuantState

    code = _code_table_on(quant_type, absmax.device)
    if absmax_8bit is None:
        return QuantState(absmax=absmax.float().reshape(-1), shape=torch.Size(shape), code=code,
                          blocksize=blocksize, quant_type=quant_type, dtype=dtype)
    state2 = QuantState(absmax=absmax.float().reshape(-1), code=absmax_code.float().reshape(-1),
                        blocksize=fmt.NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=absmax_8bit.reshape(-1), shape=torch.Size(shape), code=code, blocksize=blocksize,
                      quant_type=quant_type, dtype=dtype, offset=absmax_offset.float().reshape(()), state2=state2)


def _packed_for(B: torch.Tensor, n: int) -> torch.Tensor:
    """The first (n+1)//2 bytes of B (bitsandbytes reads no more than that)."""
    from .. import format as fmt

    b = _as_bytes(B)
    need = fmt.packed_nbytes(n)
    if b.numel() < need:
        raise ValueError(f"nf4kit/bitsandbytes: packed weight holds {b.numel()} bytes, shape needs {need}")
    return b[:need] if b.numel() > need else b


# id(absmax) -> (weakref to absmax, (absmax version, B data_ptr, B version, N, K), (packed, absmax fp32)),
# by _cached_for:
# bitsandbytes keeps its CPU-layout absmax in the layer's QuantState, one tensor per layer for the
# layer's life, while B arrives as a fresh view (weight.t()) on every call.
_cpu_layout_cache: dict = {}


def _unpack_cpu_layout_cached(B: torch.Tensor, absmax: torch.Tensor, N: int,
                              K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_unpack_cpu_layout, converted once per layer: the conversion (index shuffles over the whole
    weight) cost 5x the kernel itself, per call, in a decode (SmolLM2-135M: 3.2 vs 17.5 tok/s for
    stock bitsandbytes).  The entry is dropped with the layer's absmax and is not used if either
    tensor changed since (their version counters) or B moved.  It holds the converted copy."""
    return _cached_for(_cpu_layout_cache, absmax, (absmax._version, B.data_ptr(), B._version, N, K),
                       lambda: _unpack_cpu_layout(B, absmax, N, K))


def _unpack_cpu_layout(B: torch.Tensor, absmax: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo bitsandbytes' AVX512-BF16 CPU weight layout (``packing_format_for_cpu``).

    bitsandbytes' Linear4bit, in eval mode on a CPU with AVX512-BF16, repacks its weight as
    [N, K/2] bytes in tiles of 32 rows (low nibbles = first 32 codes of a 64-code group) and
    stores absmax as bf16 [K/blocksize, N].  Returns (standard packed uint8 [N*K/2],
    absmax fp32 [N*K/blocksize]) holding the same values.
    """
    tile = 32
    p = B.contiguous().view(torch.uint8).reshape(-1, tile)
    groups = torch.cat([p & 15, p >> 4], dim=1)                      # [-1, 64]: 32 low, 32 high
    codes = groups.reshape(N // tile, K // 2, tile, 2).transpose(1, 2).reshape(-1)  # row-major [N, K]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.contiguous(), absmax.t().reshape(-1).float().contiguous()


def _generic_dequant_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          n: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize with an arbitrary 16-entry code (neither NF4 nor FP4): a pure-torch path."""
    p = packed.to(torch.int64)
    idx = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]
    scale = absmax.float().reshape(-1)[torch.arange(n, device=packed.device) // blocksize]
    return (code.float().reshape(-1)[idx] * scale).to(dtype)


# ---------------------------------------------------------------- kernels (bitsandbytes schemas)
def _quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str,
                   quant_storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from .. import format as fmt
    from .. import ops

    fmt.check_blocksize(blocksize)
    fmt.check_quant_type(quant_type)
    if A.dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"Blockwise 4bit quantization only supports 16/32-bit floats, but got {A.dtype}")
    _count("quantize_4bit", A.device)
    n = A.numel()
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if n == 0:
        return (torch.empty((0, 1), dtype=quant_storage, device=A.device),
                torch.empty((0,), dtype=torch.float32, device=A.device))
    packed, absmax = ops.quantize_4bit(A.contiguous(), blocksize, quant_type)
    if quant_storage != torch.uint8:
        if packed.numel() % itemsize:
            raise ValueError(f"{packed.numel()} packed bytes do not fill whole {quant_storage} elements")
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1), absmax


def _dequantize_4bit_args(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                          shape: Sequence[int], dtype: torch.dtype):
    """Checks a bitsandbytes dequantize_4bit call; returns (n, the op's leading arguments)."""
    from .. import format as fmt

    fmt.check_blocksize(blocksize)
    fmt.check_quant_type(quant_type)
    if dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"Blockwise 4bit dequantization only supports 16/32-bit floats, but got {dtype}")
    _count("dequantize_4bit", A.device)
    n = math.prod(shape)
    if n == 0:
        return 0, None
    nb = fmt.num_blocks(n, blocksize)
    if absmax.numel() < nb:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n} values in blocks of {blocksize} need {nb}")
    am = absmax.reshape(-1)[:nb].float().contiguous()
    return n, (_packed_for(A, n), am, None, None, None, blocksize, quant_type, n)


def _dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                     shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    from .. import ops

    n, args = _dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype)
    if n == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=A.device)
    return ops.dequantize_4bit(*args, dtype).view(tuple(shape))


def _dequantize_4bit_out(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                         shape: Sequence[int], dtype: torch.dtype, out: torch.Tensor) -> None:
    from .. import ops

    if out.dtype != dtype or not out.is_contiguous() or out.device != A.device:
        out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))
        return
    n, args = _dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype)
    if n:
        if out.numel() != n:
            raise ValueError(f"out has {out.numel()} elements, shape {tuple(shape)} needs {n}")
        ops.dequantize_4bit_out(*args, out.view(-1))  # written in place


def _gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor,
               code: torch.Tensor, blocksize: int) -> torch.Tensor:
    from .. import functional as F

    N, K = int(shapeB[0]), int(shapeB[1])
    _count("gemv_4bit", A.device)
    if A.numel() == 0:
        return A.new_empty((*A.shape[:-1], N))
    if absmax.dim() == 2:  # bitsandbytes' CPU AVX512-BF16 layout, see _unpack_cpu_layout
        packed, absmax = _unpack_cpu_layout_cached(B, absmax, N, K)
    else:
        packed, absmax = _packed_for(B, N * K), absmax.reshape(-1).float()
    quant_type = _table_type(code)
    if quant_type is None:  # a custom 16-entry code: not a format nf4kit kernels know
        W = _generic_dequant_4bit(packed, absmax, code, blocksize, N * K, A.dtype).view(N, K)
        return torch.nn.functional.linear(A, W)
    qs = _nf4kit_state((N, K), absmax, blocksize, quant_type, A.dtype)
    return F.matmul_4bit(A, packed, qs)


def _gemv_4bit_out(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor,
                   code: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    out.copy_(_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


def _gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, blocksize: int,
               quant_type: str, bias: Optional[torch.Tensor] = None, absmax_8bit: Optional[torch.Tensor] = None,
               absmax_code: Optional[torch.Tensor] = None,
               absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    from .. import functional as F

    N, K = int(shapeB[0]), int(shapeB[1])
    _count("gemm_4bit", A.device)
    if A.numel() == 0:
        return A.new_empty((*A.shape[:-1], N))
    if absmax_8bit is not None and (absmax_code is None or absmax_offset is None):
        raise ValueError("gemm_4bit: absmax_8bit needs absmax_code and absmax_offset")
    qs = _nf4kit_state((N, K), absmax, blocksize, quant_type, A.dtype, absmax_8bit, absmax_code, absmax_offset)
    return F.matmul_4bit(A, _packed_for(B, N * K), qs, bias=None if bias is None else bias.to(A.dtype))


def _quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .. import format as fmt
    from .. import ops, reference

    if A.dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"Blockwise quantization only supports 16/32-bit floats, but got {A.dtype}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _count("quantize_blockwise", A.device)
    if A.numel() == 0:
        return torch.empty_like(A, dtype=torch.uint8), torch.empty((0,), dtype=torch.float32, device=A.device)
    x, code = A.reshape(-1).contiguous(), code.float().reshape(-1).contiguous()
    if blocksize in fmt.BLOCKSIZES and code.numel() == 256:
        q, am = ops.quantize_blockwise(x, code, blocksize)
    else:  # any other block size or map: nf4kit's reference (pure torch, same rule)
        q, am = reference.quantize_blockwise(x, code, blocksize)
    return q.view(A.shape), am


def _dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          dtype: torch.dtype) -> torch.Tensor:
    from .. import format as fmt
    from .. import ops, reference

    if A.dtype != torch.uint8:
        raise TypeError(f"A must be uint8, got {A.dtype}")
    if dtype not in fmt.FLOAT_DTYPES:
        raise TypeError(f"Blockwise dequantization only supports 16/32-bit floats, but got {dtype}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _count("dequantize_blockwise", A.device)
    n = A.numel()
    if n == 0:
        return torch.empty_like(A, dtype=dtype)
    nb = fmt.num_blocks(n, blocksize)
    if absmax.numel() < nb:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n} codes in blocks of {blocksize} need {nb}")
    q = A.reshape(-1).contiguous()
    am = absmax.reshape(-1)[:nb].float().contiguous()
    code = code.float().reshape(-1).contiguous()
    if blocksize in fmt.BLOCKSIZES and code.numel() == 256:
        out = ops.dequantize_blockwise(q, am, code, blocksize, dtype)
    else:
        out = reference.dequantize_blockwise(q, am, code, blocksize, dtype)
    return out.view(A.shape)


def _dequantize_blockwise_out(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              dtype: torch.dtype, out: torch.Tensor) -> None:
    out.copy_(_dequantize_blockwise(A, absmax, code, blocksize, dtype))


_KERNELS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "dequantize_4bit.out": _dequantize_4bit_out,
    "gemv_4bit": _gemv_4bit,
    "gemv_4bit.out": _gemv_4bit_out,
    "gemm_4bit": _gemm_4bit,
    "quantize_blockwise": _quantize_blockwise,
    "dequantize_blockwise": _dequantize_blockwise,
    "dequantize_blockwise.out": _dequantize_blockwise_out,
}


# ---------------------------------------------------------------- public switch
def is_enabled() -> bool:
    """True while nf4kit's kernels are registered for bitsandbytes' ops."""
    return _lib is not None


def registered_devices() -> tuple[str, ...]:
    """The device types nf4kit's kernels serve bitsandbytes' ops on (empty when disabled)."""
    return _devices if _lib is not None else ()


def _impl_key(op: str, dispatch_key: str) -> str:
    """torch.library's name for a Python registration (the entries of ``torch.library._impls``)."""
    return f"bitsandbytes/{op}/{dispatch_key}"


def _python_impls() -> Optional[set]:
    """torch.library's set of (namespace/op/key) that have a kernel registered from Python:
    ``Library.impl`` checks it for overrides and ``Library._destroy`` removes its own entries."""
    impls = getattr(torch.library, "_impls", None)
    return impls if isinstance(impls, set) else None


def _impl_override(lib: torch.library.Library, op: str, fn: Any, dispatch_key: str) -> None:
    """``lib.impl(op, fn, dispatch_key)`` that overrides a kernel another library registered
    from Python for the same key (bitsandbytes' own), on every torch nf4kit supports."""
    impls, key = _python_impls(), _impl_key(op, dispatch_key)
    had = impls is not None and key in impls
    if "allow_override" in inspect.signature(lib.impl).parameters:
        lib.impl(op, fn, dispatch_key, allow_override=True)
    else:
        # A torch without the flag refuses any key in torch.library._impls: take the key out
        # for the call (that check is all the flag skips; impl adds the key again).
        if had:
            impls.discard(key)
        try:
            lib.impl(op, fn, dispatch_key)
        except Exception:
            if had:
                impls.add(key)
            raise
    if had:
        # The key stays the other library's: when our fragment is destroyed (or collected),
        # torch drops the fragment's keys from that record, which would forget that
        # bitsandbytes' kernel is still registered.
        getattr(lib, "_op_impls", set()).discard(key)


def enable(devices: Sequence[str] = ("cpu", "cuda")) -> bool:
    """Register nf4kit's kernels for bitsandbytes' 4-bit / block-wise ops on `devices`.

    Idempotent.  Imports bitsandbytes' op definitions (``bitsandbytes._ops``) if needed.
    Returns True when registered.  An explicit call registers even if NF4KIT_BNB_BACKEND=0
    (the variable only gates the automatic entry point).  Overrides bitsandbytes' own kernels
    for the same ops and keys; `disable()` brings them back.
    """
    global _lib, _devices
    if _lib is not None:
        return True
    import importlib

    importlib.import_module("bitsandbytes._ops")  # defines the bitsandbytes:: schemas
    if _lib is not None:  # importing bitsandbytes ran our entry point already
        return True
    for dev in devices:
        if dev not in DEVICE_KEYS:
            raise ValueError(f"unsupported device {dev!r}; choose from {tuple(DEVICE_KEYS)}")
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")  # noqa: TOR901 (our own fragment)
    try:
        with warnings.catch_warnings():
            # "Overriding a previously registered kernel": that is the point.
            warnings.simplefilter("ignore")
            for op in OPS:
                for dev in devices:
                    _impl_override(lib, op, _KERNELS[op], DEVICE_KEYS[dev])
    except Exception:
        lib._destroy()
        raise
    _lib, _devices = lib, tuple(devices)
    return True


def disable() -> None:
    """Remove nf4kit's registrations: bitsandbytes' own kernels serve its ops again."""
    global _lib
    if _lib is not None:
        lib, _lib = _lib, None
        lib._destroy()


class enabled:
    """Context manager: nf4kit kernels on (True) or off (False) inside, previous state after."""

    def __init__(self, on: bool = True, devices: Sequence[str] = ("cpu", "cuda")) -> None:
        self.on, self.devices = on, devices

    def __enter__(self) -> "enabled":
        self.was = is_enabled()
        if self.on:
            enable(self.devices)
        else:
            disable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.was and not is_enabled():
            enable(self.devices)
        elif not self.was and is_enabled():
            disable()


def _entry_point_devices() -> tuple[str, ...]:
    """The devices the entry point registers for, from NF4KIT_BNB_BACKEND: unset or "cpu" the CPU
    only; "1" / "all" / "true" / "on" the CPU and CUDA; "0" / "false" / "off" / "no" none.

    CUDA is opt-in, for the host cost: on an H100 (benchmarks/results/gpu_h100_2026-11-27b, run1),
    bitsandbytes' M = 1 call through nf4kit takes 28.3-28.9 us of device time against 32.8-34.1 us
    stock (117-315 us before _table_type stopped syncing per call), but 172-174 us of host time
    against 62-65 us: without CUDA graphs a decode step would wait on the host.  On the CPU it runs
    at stock speed or better since its layout conversion is cached."""
    v = os.environ.get(ENV_VAR, "cpu").strip().lower()
    if v in ("0", "false", "off", "no"):
        return ()
    if v in ("1", "all", "true", "on"):
        return ("cpu", "cuda")
    return ("cpu",)


def entry_point() -> None:
    """The ``bitsandbytes.backends`` entry point: runs at the end of ``import bitsandbytes``.

    Never raises (bitsandbytes would turn it into an ImportError); problems become a warning.
    """
    try:
        devices = _entry_point_devices()
        if not devices:
            return
        enable(devices)
    except Exception as e:  # noqa: BLE001 - must never break `import bitsandbytes`
        try:
            disable()
        except Exception:  # noqa: BLE001
            pass
        warnings.warn(f"nf4kit: could not register as a bitsandbytes backend ({type(e).__name__}: {e}); "
                      "bitsandbytes' own kernels are used", RuntimeWarning, stacklevel=2)
