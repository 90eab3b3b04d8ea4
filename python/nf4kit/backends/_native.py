"""Loading nf4kit._C and calling into it: pointers, dtype codes, status checks."""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

import torch

# Must match csrc/core/nf4_core.h (core::DType, core::QuantType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPE_CODES = {"nf4": 0, "fp4": 1}

_C: Optional[ModuleType] = None
_tried = False
load_error: Optional[str] = None


def load() -> Optional[ModuleType]:
    """nf4kit._C, or None (with one warning) when the extension was not built."""
    global _C, _tried, load_error
    if not _tried:
        _tried = True
        try:
            from .. import _C as ext  # type: ignore[attr-defined]
            _C = ext
        except ImportError as e:
            load_error = str(e)
            warnings.warn(f"nf4kit: compiled extension not available ({e}); using the pure-PyTorch backend. "
                          "Reinstall with `pip install .` to build the C++/CUDA kernels.", RuntimeWarning,
                          stacklevel=3)
    return _C


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def flat(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """t as a contiguous 1-D tensor (in `dtype` if given): t itself when it already is one.

    The test costs a few attribute reads; the reshape / cast / contiguous chain it replaces costs
    three dispatcher calls (~1 us each on a CPU), paid per state tensor on every decode call."""
    if t.dim() == 1 and (dtype is None or t.dtype == dtype) and t.is_contiguous():
        return t
    t = t.reshape(-1)
    return (t if dtype is None else t.to(dtype)).contiguous()


def check(status: int, kernel: str) -> None:
    if status != 0:
        C = load()
        msg = C.error_string(status) if C is not None else str(status)
        raise RuntimeError(f"nf4kit kernel {kernel} failed: {msg} (status {status})")
