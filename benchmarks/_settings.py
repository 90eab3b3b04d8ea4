"""Backend routing settings (module attributes such as cuda.GEMV_STREAM) set for one benchmark step
and restored after it, even when the step raises."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


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
