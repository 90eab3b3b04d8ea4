"""Roofline model of the nf4kit kernels (issue 6 item 3, DESIGN.md §7).

For every benchmark case: the fewest bytes it must move through memory (each input read once,
each output written once) and the FLOPs it must do.  Over a machine's ceilings (copy bandwidth
counting bytes read + written; dense matmul rate) they give a floor time: no kernel runs much
faster, and measured / floor is the gap left.  `benchmarks.run` prints the floor beside every
time, computed from ceilings MEASURED IN THE SAME RUN; the nominal H100 ceilings below are what
the kernel report and offline planning use.

    python -m benchmarks.roofline          # floors of the standard shapes on an H100
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

NESTED_BLOCKSIZE = 256  # double quant: 8-bit codes of the absmax in blocks of 256


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """A machine's two ceilings.  copy_bw: bytes/s (read + written); matmul_rate: FLOP/s."""

    name: str
    copy_bw: float
    matmul_rate: float
    source: str = "nominal"


# Measured on a lent H100 80GB HBM3 of this workplace (device KINDS.md, 2026-11-13): a
# device-to-device copy at ≈3.0 TB/s counting read+write, an 8192³ bf16 matmul at ≈798 TFLOP/s.
H100 = Ceilings("H100 80GB HBM3", 3.0e12, 800e12, "nominal (KINDS.md measurement)")
# The same, seen on an H200 here: 4.3 TB/s, ≈790 TFLOP/s.
H200 = Ceilings("H200", 4.3e12, 790e12, "nominal (KINDS.md measurement)")

# Llama-shaped weights [N, K] = [out, in] (7B/8B: q/o projection, gate/up, down).
LLAMA_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (14336, 4096), (4096, 14336))
M_VALUES: tuple[int, ...] = (1, 16, 256, 4096)


@dataclasses.dataclass(frozen=True)
class Work:
    """Minimal bytes moved and FLOPs done by one call."""

    bytes: float
    flops: float

    def floor_s(self, c: Ceilings) -> float:
        """max(bytes / bandwidth, flops / rate): the roofline floor, seconds."""
        return max(self.bytes / c.copy_bw, self.flops / c.matmul_rate)

    def bound(self, c: Ceilings) -> str:
        """'memory' or 'compute': which term sets the floor."""
        return "memory" if self.bytes / c.copy_bw >= self.flops / c.matmul_rate else "compute"

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def state_bytes(n: int, blocksize: int, nested: bool) -> int:
    """Bytes of the quant state of an n-element tensor: absmax fp32, or u8 codes + nested fp32
    absmax + the 256-entry fp32 map + the fp32 offset."""
    nb = num_blocks(n, blocksize)
    if not nested:
        return 4 * nb
    return nb + 4 * num_blocks(nb, NESTED_BLOCKSIZE) + 4 * 256 + 4


def packed_bytes(n: int) -> int:
    return (n + 1) // 2


def quantize_4bit_work(n: int, in_dtype: torch.dtype, blocksize: int = 64, nested: bool = False) -> Work:
    """Read the weight once; write packed codes and the state."""
    return Work(n * itemsize(in_dtype) + packed_bytes(n) + state_bytes(n, blocksize, nested)
                + (4 * num_blocks(n, blocksize) if nested else 0), 0.0)


def dequantize_4bit_work(n: int, out_dtype: torch.dtype, blocksize: int = 64, nested: bool = False) -> Work:
    """Read packed codes + state once, write n outputs."""
    return Work(packed_bytes(n) + state_bytes(n, blocksize, nested) + n * itemsize(out_dtype), 0.0)


def lora_work(M: int, N: int, K: int, r: int, dtype: torch.dtype) -> Work:
    """The LoRA term s·(X·Aᵀ)·Bᵀ: reads A [r,K] and B [N,r]; 2·M·r·(K+N) FLOPs."""
    if r <= 0:
        return Work(0.0, 0.0)
    return Work(float(r * (K + N) * itemsize(dtype)), 2.0 * M * r * (K + N))


def matmul_4bit_work(M: int, N: int, K: int, act_dtype: torch.dtype, blocksize: int = 64, nested: bool = True,
                     r: int = 0, bias: bool = False) -> Work:
    """Y[M,N] = X[M,K]·deq(W[N,K])ᵀ (+ LoRA, + bias): W packed read once, X read, Y written."""
    a = itemsize(act_dtype)
    w = packed_bytes(N * K) + state_bytes(N * K, blocksize, nested)
    base = Work(float(w + M * K * a + M * N * a + (N * a if bias else 0)), 2.0 * M * N * K)
    return base + lora_work(M, N, K, r, act_dtype)


def backward_input_work(M: int, N: int, K: int, act_dtype: torch.dtype, blocksize: int = 64, nested: bool = True,
                        r: int = 0) -> Work:
    """dX[M,K] = dY[M,N]·deq(W) (+ s·(dY·B)·A): W packed read once, dY read, dX written."""
    a = itemsize(act_dtype)
    w = packed_bytes(N * K) + state_bytes(N * K, blocksize, nested)
    return Work(float(w + M * N * a + M * K * a), 2.0 * M * N * K) + lora_work(M, N, K, r, act_dtype)


def dense_linear_work(M: int, N: int, K: int, dtype: torch.dtype) -> Work:
    """F.linear on a dense weight: the anchors' floor (the weight is read at full width)."""
    a = itemsize(dtype)
    return Work(float(N * K * a + M * K * a + M * N * a), 2.0 * M * N * K)


def lora_layer_fwd_bwd_work(M: int, N: int, K: int, r: int, act_dtype: torch.dtype, blocksize: int = 64,
                            nested: bool = True) -> Work:
    """Forward + backward of a QLoRA layer (grads for X, A, B; the frozen W gets none):
    forward Y, backward dX, and dA = s·(dY·B)ᵀ·X, dB = s·dYᵀ·(X·Aᵀ)."""
    a = itemsize(act_dtype)
    fwd = matmul_4bit_work(M, N, K, act_dtype, blocksize, nested, r)
    bwd = backward_input_work(M, N, K, act_dtype, blocksize, nested, r)
    grads = Work(float(M * K * a + r * (K + N) * a), 2.0 * M * r * (K + N))  # re-read X, write dA, dB
    return fwd + bwd + grads


def copy_work(nbytes: int) -> Work:
    """A clone: nbytes read + nbytes written."""
    return Work(2.0 * nbytes, 0.0)


def format_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def standard_table(c: Ceilings = H100, act_dtype: torch.dtype = torch.bfloat16, r: int = 16) -> list[dict]:
    """Floors of the standard benchmark cases on ceilings `c` (rows of dicts)."""
    rows = []
    for (N, K) in LLAMA_SHAPES:
        n = N * K
        for name, w in (("quantize_4bit", quantize_4bit_work(n, act_dtype, nested=True)),
                        ("dequantize_4bit(nested)", dequantize_4bit_work(n, act_dtype, nested=True)),
                        ("dequantize_4bit", dequantize_4bit_work(n, act_dtype, nested=False))):
            rows.append(dict(case=name, N=N, K=K, M=None, bytes=w.bytes, flops=w.flops, floor_s=w.floor_s(c),
                             bound=w.bound(c)))
        for M in M_VALUES:
            for name, w in (("matmul_4bit", matmul_4bit_work(M, N, K, act_dtype)),
                            (f"matmul_4bit+lora{r}", matmul_4bit_work(M, N, K, act_dtype, r=r)),
                            ("backward_input", backward_input_work(M, N, K, act_dtype, r=r)),
                            ("dense F.linear", dense_linear_work(M, N, K, act_dtype))):
                rows.append(dict(case=name, N=N, K=K, M=M, bytes=w.bytes, flops=w.flops, floor_s=w.floor_s(c),
                                 bound=w.bound(c)))
    return rows


def markdown_table(rows: list[dict], c: Ceilings) -> str:
    out = [f"Roofline floors on {c.name} (copy {c.copy_bw / 1e12:.2f} TB/s, matmul "
           f"{c.matmul_rate / 1e12:.0f} TFLOP/s; {c.source})", "",
           "| case | N×K | M | MB moved | GFLOP | floor | bound |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['N']}×{r['K']} | {r['M'] if r['M'] is not None else '-'} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | {format_time(r['floor_s'])} | {r['bound']} |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table(standard_table(H100), H100))
