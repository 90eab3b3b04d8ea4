"""build_info(): what was compiled, and which backends are usable now."""
from __future__ import annotations

from typing import Any

import torch

from . import backends
from .backends import _native


def build_info() -> dict[str, Any]:
    """CPU kernels, CUDA archs and compiler, Triton version, backends usable now."""
    C = _native.load()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "nf4kit": __import__("nf4kit").__version__,
        "extension": C is not None,
        "extension_error": _native.load_error,
        "cpu_kernels": bool(C is not None and getattr(C, "has_cpu", False)),
        "cuda_kernels": bool(C is not None and getattr(C, "has_cuda", False)),
        "cuda_archs": (C.cuda_archs.split(",") if C is not None and C.cuda_archs else []),
        "cuda_compiler": (C.cuda_compiler_version if C is not None else "") or None,
        "cuda_runtime_torch": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "torch": torch.__version__,
        "backends_available": backends.available_backends(),
        "cuda_default_chain": list(backends.CUDA_DEFAULT_CHAIN),
    }
