"""Host (Python) cost of one 4-bit linear call, layer by layer, at decode shapes.

  python -m benchmarks.host_overhead [--device cpu|cuda] [--md out.md]

A decode step calls every linear layer once with M = 1; the packed weights of a small model are
read in a few microseconds, so what a token costs is mostly the Python between the user's call
and the kernel.  This times, per call, with the same weight:

  layer     nf4kit.nn.Linear4bit(x)            (what a transformers model calls)
  public    nf4kit.matmul_4bit(x, packed, qs)  (validation + autograd wrapper + dispatch + backend)
  dispatch  nf4kit.backends.run(...)           (backend chain + the backend's own Python + kernel)
  kernel    the backend's kernel call alone    (cpu / cuda: the C++ entry point on prepared operands)
  launch    triton: the captured kernel launch replayed (through triton.autotune when autotuned);
  jit launch  the same launch on the bare JIT function with the chosen config
  anchors   torch F.linear on the dense weight in the compute dtype; nn.Linear

On a CPU every time is wall time, kernel included (the kernel row shows how much that is).  On a
GPU the time is the CPU time to enqueue one call (synchronising every 64 calls keeps the queue
short), i.e. what a decode loop without CUDA graphs pays per layer.  Best of 7 rounds of medians.
Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import nf4kit
from nf4kit import backends, ops
from nf4kit.format import packed_as_bytes

# SmolLM2-135M's projections (hidden 576, MLP 1536) and a tiny one where the kernel is ~free.
SHAPES = [(64, 128), (1536, 576), (576, 1536)]


def _per_call_us(fn: Callable[[], object], device: torch.device, calls: int = 400, rounds: int = 7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(50):
        fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        samples = []
        for _ in range(calls // 64):
            t0 = time.perf_counter()
            for _ in range(64):
                fn()
            samples.append((time.perf_counter() - t0) / 64)
            sync()  # outside the timed span: on a GPU only the enqueue is measured
        best = min(best, statistics.median(samples))
    return best * 1e6


def measure(device: torch.device, dtype: torch.dtype, shapes=SHAPES, calls: int = 400, rounds: int = 7) -> list[dict]:
    """One row per weight shape: µs per call of each layer of the call (see the module docstring)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for N, K in shapes:
        dense = torch.nn.Linear(K, N, bias=False).to(device)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
        layer = nf4kit.nn.Linear4bit.from_linear(dense, compute_dtype=dtype).to(device)
        packed, qs = layer.weight, layer.quant_state
        x = torch.randn(1, K, generator=g).to(device=device, dtype=dtype)
        w_dense = dense.weight.detach().to(dtype)
        args = (x, packed_as_bytes(packed), *ops.state_args(qs), qs.blocksize, qs.quant_type, N, K, None, None,
                None, 1.0)
        dense_c = torch.nn.Linear(K, N, bias=False).to(device=device, dtype=dtype)
        fns: dict[str, Callable[[], object]] = {
            "layer": lambda: layer(x),
            "public": lambda: nf4kit.matmul_4bit(x, packed, qs),
            "dispatch": lambda: backends.run("matmul_4bit", x.device, *args),
        }
        with torch.no_grad():
            backends.run("matmul_4bit", x.device, *args)  # who serves it (and a warm, tuned kernel)
        served = backends.last_backend["matmul_4bit"]
        kernel = _kernel_call(device, args)
        if kernel is not None:
            fns["kernel"] = kernel
        with torch.no_grad():
            fns.update(_triton_launches(args))
        fns["F.linear dense"] = lambda: torch.nn.functional.linear(x, w_dense)
        fns["nn.Linear dense"] = lambda: dense_c(x)
        with torch.no_grad():
            times = {k: _per_call_us(f, device, calls, rounds) for k, f in fns.items()}
        rows.append({"shape": f"{N}x{K}", "backend": served, "dtype": str(dtype).replace("torch.", ""), **times})
    return rows


def _kernel_call(device: torch.device, args: tuple):
    """The served backend's M = 1 kernel call with its operands prepared once (cpu or cuda GEMV)."""
    if backends.last_backend.get("matmul_4bit") == "triton":
        return None  # see _triton_launches
    if device.type == "cuda":
        return _cuda_kernel_call(args)
    if device.type != "cpu":
        return None
    from nf4kit.backends import cpu as cpu_backend
    from nf4kit.backends._native import check, load, ptr

    if not cpu_backend.is_available() or cpu_backend.isa() not in cpu_backend._FUSED_ISAS:
        return None
    x, packed, absmax, na, nc, off, bs, qt, N, K = args[:10]
    keep, weight = cpu_backend._weight_args(packed, absmax, na, nc, off, bs, qt)
    xf = x.float().contiguous()
    y = torch.empty((1, N), dtype=torch.float32)
    C = load()

    def fn():
        check(C.cpu.gemv_4bit(ptr(xf), 1, *weight, N, K, 0, ptr(y)), "cpu.gemv_4bit")
        return keep

    return fn


def _triton_launches(args: tuple) -> dict[str, Callable[[], object]]:
    """triton backend: the last launch of one call replayed as captured ("launch": through
    triton.autotune when the kernel is autotuned) and straight on the JIT function with the config
    the autotuner chose ("jit launch"), so the autotuner's own per-call cost shows apart."""
    from nf4kit.triton_kernels import matmul as tm

    if backends.last_backend.get("matmul_4bit") != "triton":
        return {}
    captured: list = []
    real = tm._launch

    def spy(kernel, cfg, grid, a, consts):
        captured.append((kernel, cfg, grid, a, consts))
        return real(kernel, cfg, grid, a, consts)

    tm._launch = spy
    try:
        backends.run("matmul_4bit", args[0].device, *args)
    finally:
        tm._launch = real
    if not captured:
        return {}
    kernel, cfg, grid, a, consts = captured[-1]
    out = {"launch": lambda: real(kernel, cfg, grid, a, consts)}
    best = cfg if cfg is not None else getattr(kernel, "best_config", None)
    jit = getattr(kernel, "fn", kernel) if cfg is None else kernel
    if best is not None:
        out["jit launch"] = lambda: real(jit, best, grid, a, consts)
    return out


def _cuda_kernel_call(args: tuple):
    """cuda backend: backends/cuda.py's GEMV launch (_launch_gemv) alone, its operands, split count
    and buffers prepared once (None if that backend does not serve here)."""
    from nf4kit.backends import cuda as cb
    from nf4kit.backends._native import QUANT_TYPE_CODES

    if backends.last_backend.get("matmul_4bit") != "cuda":
        return None
    x, packed, absmax, na, nc, off, bs, qt, N, K = args[:10]
    operands = cb._operands(x, packed, absmax, na, nc, off, bs)
    if operands is None:
        return None
    x, packed, pointers, keep = operands
    dev = x.device
    S = cb._gemv_split_count(1, N, K, x.dtype, bs, dev)
    partial = torch.empty(S * N, dtype=torch.float32, device=dev)
    y = torch.empty((1, N), dtype=x.dtype, device=dev)

    def fn():
        cb._launch_gemv(x, packed, pointers, bs, QUANT_TYPE_CODES[qt], N, K, S, partial, (None, None, None, 0), y,
                        cb._stream(dev))
        return keep

    return fn


def to_markdown(rows: list[dict], device: torch.device) -> str:
    cols = [c for c in ("layer", "public", "dispatch", "kernel", "launch", "jit launch", "F.linear dense",
                        "nn.Linear dense") if c in rows[0]]
    what = "wall time per call (kernel included)" if device.type == "cpu" else "CPU time to enqueue one call"
    out = [f"Host cost of one M = 1 call, µs ({what}); torch {torch.__version__}", "",
           "| weight N×K | backend | dtype | " + " | ".join(cols) + " | layer / nn.Linear |",
           "|---|---|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        out.append(f"| {r['shape']} | {r['backend']} | {r['dtype']} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                   + f" | {r['layer'] / r['nn.Linear dense']:.2f}× |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default=None, choices=backends.BACKEND_NAMES, help="put this backend first")
    p.add_argument("--calls", type=int, default=400, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds (the best median is kept)")
    p.add_argument("--md", default=None, help="also write the table here")
    a = p.parse_args()
    device = torch.device(a.device)
    with nf4kit.use_backend(a.backend):
        md = to_markdown(measure(device, getattr(torch, a.dtype), calls=a.calls, rounds=a.rounds), device)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
