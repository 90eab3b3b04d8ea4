"""Backend routing settings (module attributes such as cuda.GEMV_STREAM) set for one benchmark step
and restored after it, even when the step raises."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


# The cuda backend's plain M = 1 tensor-core kernel: its split-K finalize on an ordinary launch, with
# the block reduce and the PDL launch (the defaults since results/gpu_h100_2026-11-27c) off.
PLAIN_MMA = dict(GEMV_MMA=True, GEMV_MMA_BLOCK_REDUCE=False, GEMV_PDL=False)


@contextmanager
def settings(module: object, **values: Any) -> Iterator[None]:
    """Set module.NAME = value for each keyword while the block runs; a name the module does not
    have raises AttributeError (a misspelt setting would otherwise change nothing)."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
