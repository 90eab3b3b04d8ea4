"""The anchors nf4kit is measured against (DESIGN.md §7), each optional.

bitsandbytes 0.50 (dequantize_4bit, gemv_4bit through bnb.matmul_4bit at M = 1, its gemm path
— dequantize + matmul — at M > 1), torch F.linear on the dense weight (fp32 and bf16), and a
PEFT + bitsandbytes LoRA layer forward + backward (GPU).  A missing library gives an anchor
that is `None` with a reason; callers print "n/a".  Nothing here may raise for a missing
dependency.

The bitsandbytes anchors are stock bitsandbytes: nf4kit registers itself as a bitsandbytes
backend through an entry point that `import bitsandbytes` runs (nf4kit.integrations.bitsandbytes),
which would route these calls into nf4kit's own kernels.  `bitsandbytes()` therefore imports it
with NF4KIT_BNB_BACKEND=0 and disables any registration made before; `stock_bitsandbytes()`
says whether that holds (the benchmark records it).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Thunk = Callable[[], object]

_bnb = None
_bnb_error: Optional[str] = None


def bitsandbytes():
    """The bitsandbytes module, or None (reason in bnb_error())."""
    global _bnb, _bnb_error
    if _bnb is None and _bnb_error is None:
        try:
            # bitsandbytes prints noise about optional CPU kernels on import; keep our output clean.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                saved = os.environ.get("NF4KIT_BNB_BACKEND")
                os.environ["NF4KIT_BNB_BACKEND"] = "0"  # the entry point registers nothing
                try:
                    import bitsandbytes as bnb  # type: ignore
                    import bitsandbytes.functional  # noqa: F401
                finally:
                    logging.disable(logging.NOTSET)
                    if saved is None:
                        os.environ.pop("NF4KIT_BNB_BACKEND", None)
                    else:
                        os.environ["NF4KIT_BNB_BACKEND"] = saved
            _bnb = bnb
        except Exception as e:  # ImportError, or a broken install (missing CUDA libs)
            _bnb_error = f"bitsandbytes not usable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if _bnb is not None:
        _disable_nf4kit_backend()  # every time an anchor is built: something may have enabled it since
    return _bnb


def _disable_nf4kit_backend() -> None:
    """Undo nf4kit's registration as a bitsandbytes backend (made by an earlier import of
    bitsandbytes in this process, or by a caller), so that the anchors run bitsandbytes' kernels."""
    try:
        from nf4kit.integrations import bitsandbytes as nf4kit_bnb
    except ImportError:
        return
    nf4kit_bnb.disable()


def stock_bitsandbytes() -> bool:
    """True when bitsandbytes' calls reach its own kernels (nf4kit not registered as its backend)."""
    if bitsandbytes() is None:
        return False
    from nf4kit.integrations import bitsandbytes as nf4kit_bnb

    return not nf4kit_bnb.is_enabled()


def bnb_version() -> Optional[str]:
    bnb = bitsandbytes()
    return getattr(bnb, "__version__", None) if bnb is not None else None


def bnb_error() -> Optional[str]:
    bitsandbytes()
    return _bnb_error


def to_bnb_state(qs, packed: torch.Tensor):
    """nf4kit QuantState -> bitsandbytes QuantState over the same tensors (the format is
    bitsandbytes', so no requantization: the anchors decode exactly our bytes)."""
    bnb = bitsandbytes()
    BQS = bnb.functional.QuantState
    state2 = None
    if qs.nested:
        state2 = BQS(absmax=qs.state2.absmax, code=qs.state2.code, blocksize=qs.state2.blocksize,
                     dtype=torch.float32)
    return BQS(absmax=qs.absmax, shape=torch.Size(qs.shape), code=qs.code, blocksize=qs.blocksize,
               quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset, state2=state2)


def bnb_quantize(W: torch.Tensor, nested: bool) -> tuple[Optional[Thunk], str]:
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    return (lambda: bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4"),
            f"bnb {bnb.__version__} quantize_4bit")


def bnb_dequantize(packed: torch.Tensor, qs) -> tuple[Optional[Thunk], str]:
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    try:
        bqs = to_bnb_state(qs, packed)
    except Exception as e:  # pragma: no cover - a bitsandbytes API change
        return None, f"bitsandbytes QuantState: {e}"
    return (lambda: bnb.functional.dequantize_4bit(packed, bqs)), f"bnb {bnb.__version__} dequantize_4bit"


def bnb_matmul(x: torch.Tensor, packed: torch.Tensor, qs) -> tuple[Optional[Thunk], str]:
    """bnb.matmul_4bit: gemv_4bit when x is a single row and no grad is needed, else its
    gemm path (dequantize + matmul)."""
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    bqs = to_bnb_state(qs, packed)
    path = "gemv_4bit" if x.numel() == x.shape[-1] else "dequant+matmul"
    return (lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bqs)), f"bnb {bnb.__version__} {path}"


def bnb_matmul_lora(x, packed, qs, A, B, s) -> tuple[Optional[Thunk], str]:
    """bnb.matmul_4bit plus the LoRA term in torch (what PEFT's forward does, without the module)."""
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    bqs = to_bnb_state(qs, packed)

    def run():
        y = bnb.matmul_4bit(x, packed.t(), quant_state=bqs)
        return y + s * ((x @ A.t()) @ B.t())

    return run, f"bnb {bnb.__version__} matmul_4bit + torch LoRA"


def bnb_backward_input(dy, packed, qs, A, B, s) -> tuple[Optional[Thunk], str]:
    """What bitsandbytes' MatMul4Bit backward does for dX: dequantize, then dY·W (+ LoRA term)."""
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    bqs = to_bnb_state(qs, packed)

    def run():
        W = bnb.functional.dequantize_4bit(packed, bqs).to(dy.dtype)
        return dy @ W + s * ((dy @ B) @ A)

    return run, f"bnb {bnb.__version__} dequantize + matmul"


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dense_linear_label(dtype: torch.dtype) -> str:
    """The dense F.linear anchor's name in bench rows (benchmarks.decode_floor fits these)."""
    return f"torch F.linear {_DTYPE_NAMES[dtype]} dense"


def dense_linear(x: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> tuple[Thunk, str]:
    """torch F.linear on the dense weight in `dtype` (fp32 / bf16)."""
    xd, Wd = x.to(dtype), W.to(dtype)
    return (lambda: F.linear(xd, Wd)), dense_linear_label(dtype)


def dense_linear_lora(x, W, A, B, s, dtype) -> tuple[Thunk, str]:
    xd, Wd, Ad, Bd = x.to(dtype), W.to(dtype), A.to(dtype), B.to(dtype)
    return (lambda: F.linear(xd, Wd) + s * F.linear(F.linear(xd, Ad), Bd)), dense_linear_label(dtype) + " + LoRA"


def dense_backward_input(dy, W, A, B, s, dtype) -> tuple[Thunk, str]:
    dyd, Wd, Ad, Bd = dy.to(dtype), W.to(dtype), A.to(dtype), B.to(dtype)
    return (lambda: dyd @ Wd + s * ((dyd @ Bd) @ Ad)), f"torch {_DTYPE_NAMES[dtype]} dense dY·W + LoRA"


def dense_lora_layer_fwd_bwd(x, W, A, B, s, dy) -> tuple[Thunk, str]:
    """Frozen dense W, trainable A/B, grad for x: the 16-bit LoRA layer's fwd + bwd."""
    xr = x.detach().clone().requires_grad_(True)
    Ar = A.detach().clone().requires_grad_(True)
    Br = B.detach().clone().requires_grad_(True)
    Wd = W.to(x.dtype)

    def run():
        xr.grad = Ar.grad = Br.grad = None
        y = F.linear(xr, Wd) + s * F.linear(F.linear(xr, Ar), Br)
        y.backward(dy)

    return run, f"torch {str(x.dtype).replace('torch.', '')} dense + LoRA fwd+bwd"


def peft_bnb_lora_layer_fwd_bwd(x, W, r: int, alpha: int, dy) -> tuple[Optional[Thunk], str]:
    """A bitsandbytes Linear4bit (nf4, double quant) wrapped by PEFT's LoRA, forward + backward
    (grads for x and the adapters), as a stock QLoRA layer runs."""
    bnb = bitsandbytes()
    if bnb is None:
        return None, bnb_error() or "bitsandbytes missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import peft  # type: ignore
    except Exception as e:
        return None, f"peft not usable: {type(e).__name__}"
    N, K = W.shape
    device = x.device

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=x.dtype, compress_statistics=True,
                                         quant_type="nf4")
            self.lin.weight = bnb.nn.Params4bit(W.detach().cpu(), requires_grad=False, compress_statistics=True,
                                                quant_type="nf4", blocksize=64)

        def forward(self, t):
            return self.lin(t)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Wrap().to(device)  # Params4bit quantizes on the move to the device
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"], bias="none")
            model = peft.get_peft_model(model, cfg)
    except Exception as e:
        return None, f"PEFT+bnb layer could not be built: {type(e).__name__}: {e}"
    xr = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        xr.grad = None
        for p in params:
            p.grad = None
        y = model(xr)
        y.backward(dy.to(y.dtype))

    return run, f"PEFT {peft.__version__} + bnb {bnb.__version__} LoRA fwd+bwd"
