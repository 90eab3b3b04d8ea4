"""Backend registry and per-call dispatch (DESIGN.md §2).

A backend is a module in this package with:
  NAME: str
  is_available() -> bool          usable on this machine at all
  serves(device) -> bool          can run on tensors of this device
  <op>(*args) for the ops it implements (the signatures of nf4kit/reference.py);
  an op may return NotImplemented for arguments it cannot serve, and the next backend runs.

Default chain: CPU tensors -> cpu, torch.  CUDA tensors -> cuda, triton, torch, except where
the H100 benchmark (benchmarks/results/gpu_h100_2026-11-26) measured triton faster: see
cuda_chain().  `NF4KIT_BACKEND=name` or `with nf4kit.use_backend(name):` puts `name` first.
"""
from __future__ import annotations

import collections
import importlib
import os
import threading
from types import ModuleType
from typing import Any, Optional

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
_MODULES = {"cuda": "cuda", "triton": "triton", "cpu": "cpu", "torch": "torch_ref"}
CUDA_DEFAULT_CHAIN = ("cuda", "triton", "torch")
TRITON_FIRST_CHAIN = ("triton", "cuda", "torch")
# Largest M at which the cuda backend's matmul is served first (H100, 4096x14336, device time,
# benchmarks/results/gpu_h100_2026-11-26b): its split-K kernels beat Triton's at M = 16 and 64
# (59.4 vs 71.8 us, 67.6 vs 109 us); at M = 1 the two are within 6% (32.2 / 30.4 us); from
# M = 256 Triton's dequantize + cuBLAS wins (120 vs 214 us).
CUDA_MATMUL_MAX_M = 64
CPU_DEFAULT_CHAIN = ("cpu", "torch")

_loaded: dict[str, Optional[ModuleType]] = {}
# The forced-backend stack is process-wide, not thread-local: autograd runs CUDA backward
# passes on its own threads, and a `with use_backend(...)` around .backward() must reach them.
_stack: list[str] = []
_stack_lock = threading.Lock()
# (op, backend) -> number of calls served; tests use it to prove which kernel ran.
call_counts: collections.Counter = collections.Counter()
last_backend: dict[str, str] = {}


def get(name: str) -> Optional[ModuleType]:
    """The backend module, or None if it cannot be imported."""
    if name not in _MODULES:
        raise ValueError(f"unknown nf4kit backend {name!r}; choose from {BACKEND_NAMES}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def available_backends() -> list[str]:
    """Backends usable on this machine now, in default priority order."""
    out = []
    for name in BACKEND_NAMES:
        mod = get(name)
        if mod is not None and mod.is_available():
            out.append(name)
    return out


def _forced() -> Optional[str]:
    if _stack:
        return _stack[-1]
    env = os.environ.get("NF4KIT_BACKEND", "").strip()
    return env or None


class use_backend:
    """Put backend `name` first for the calls made while it is active (process-wide).

    `with nf4kit.use_backend("triton"): ...` restores the previous choice on exit; a plain
    call `nf4kit.use_backend("cpu")` keeps it until `nf4kit.use_backend(None)`.
    """

    def __init__(self, name: Optional[str]) -> None:
        if name is not None and name not in BACKEND_NAMES:
            raise ValueError(f"unknown nf4kit backend {name!r}; choose from {BACKEND_NAMES}")
        with _stack_lock:
            self._depth = len(_stack)
            if name is None:
                _stack.clear()
            else:
                _stack.append(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        with _stack_lock:
            del _stack[self._depth:]


def cuda_chain(op: Optional[str], args: tuple = ()) -> tuple[str, ...]:
    """Backend order for CUDA tensors, per op and M, as measured on an H100 (2026-11-26,
    device time): both one-launch dequantizes run at 88% of copy (cuda enqueues faster); the
    cuda matmuls win up to M = 64 (CUDA_MATMUL_MAX_M), Triton's above; Triton's backward dX
    wins at every M measured (1.16x at M = 4096).  M = 1 (2026-11-27b): Triton's stream kernel is
    0.7-2.4 us faster on the device (23.0-23.3 against 24.0-25.4 us), but a call costs about twice
    the host time (240-253 against 119-129 us), which an eager decode step waits on: cuda stays first."""
    if op == "matmul_4bit_backward_input":
        return TRITON_FIRST_CHAIN
    if op == "matmul_4bit":
        M = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else 0
        return CUDA_DEFAULT_CHAIN if M <= CUDA_MATMUL_MAX_M else TRITON_FIRST_CHAIN
    return CUDA_DEFAULT_CHAIN


def chain(device: torch.device, op: Optional[str] = None, args: tuple = ()) -> list[str]:
    default = cuda_chain(op, args) if device.type == "cuda" else CPU_DEFAULT_CHAIN
    forced = _forced()
    if forced is not None and forced not in BACKEND_NAMES:
        raise ValueError(f"NF4KIT_BACKEND={forced!r} is not a backend; choose from {BACKEND_NAMES}")
    names = ([forced] if forced else []) + [b for b in default if b != forced]
    if "torch" not in names:
        names.append("torch")
    return names


def _out_adapter(mod: ModuleType, op: str):
    """A backend without `<op>_out` serves it through `<op>` and a copy into `out` (the last arg)."""
    base = getattr(mod, op[:-4], None) if op.endswith("_out") else None
    if base is None:
        return None

    def fn(*args: Any) -> Any:
        *inputs, out = args
        result = base(*inputs, out.dtype)
        if result is NotImplemented:
            return NotImplemented
        out.copy_(result)
        return None

    return fn


def run(op: str, device: torch.device, *args: Any) -> Any:
    """Run `op` on the first backend of the chain that serves it."""
    for name in chain(device, op, args):
        mod = get(name)
        if mod is None or not mod.is_available() or not mod.serves(device):
            continue
        fn = getattr(mod, op, None) or _out_adapter(mod, op)
        if fn is None:
            continue
        result = fn(*args)
        if result is NotImplemented:
            continue
        call_counts[(op, name)] += 1
        last_backend[op] = name
        return result
    raise RuntimeError(f"nf4kit: no backend could run {op} on {device}")  # torch always can
