"""Time every nf4kit kernel through the public API, beside its roofline floor and its anchors.

    python -m benchmarks.run [--device cpu|cuda] [--json out.json] [--md out.md] [--quick]
                             [--backends cpu,torch] [--cases dequantize_4bit,...] [--budget-s 180]

For each case (quantize, dequantize with and without double quant, matmul at M = 1, 16, 256
(, 4096 on a GPU), the fused forward with LoRA r = 16, the backward dX, a LoRA layer fwd+bwd)
and for each backend that serves the device (forced with `nf4kit.use_backend`, and checked
afterwards with `nf4kit.backends.last_backend`: a fallback is reported, never hidden), it
prints the median time, achieved GB/s and TFLOP/s, the fraction of the copy bandwidth /
matmul rate MEASURED IN THE SAME RUN, the roofline floor, and the speed ratio against every
anchor that is available (bitsandbytes, dense F.linear fp32/bf16, PEFT+bitsandbytes).
Missing anchors print "n/a".  A sanity column gives each result's relative error against the
torch backend (a wrong kernel must not produce a fast number unnoticed).

Benchmarks are measurements: no timing assertion belongs in tests/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

import torch

from . import anchors as anc
from . import roofline as rl
from ._timing import Timing, bench, synchronize

LORA_R = 16
LORA_ALPHA = 32
LORA_SCALE = LORA_ALPHA / LORA_R
BLOCKSIZE = 64

ALL_CASES = ("quantize_4bit", "dequantize_4bit", "matmul_4bit", "matmul_4bit_lora", "backward_input",
             "lora_layer_fwd_bwd")


# ---------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case.  N×K is the weight [out, in]; M the rows of X (None: no matmul)."""

    kind: str             # one of ALL_CASES
    N: int
    K: int
    M: Optional[int] = None
    nested: bool = True   # double quant of the absmax
    variant: str = ""     # "api" / "op" for quantize

    @property
    def label(self) -> str:
        s = f"{self.kind}"
        if self.kind in ("quantize_4bit", "dequantize_4bit"):
            s += "(dq)" if self.nested else "(plain)"
        if self.variant:
            s += f"[{self.variant}]"
        s += f" {self.N}x{self.K}"
        if self.M is not None:
            s += f" M={self.M}"
        return s


def plan(device: str, quick: bool, shapes: Optional[list[tuple[int, int]]] = None,
         ms: Optional[list[int]] = None, cases: Optional[list[str]] = None) -> list[Case]:
    """The cases to run.  GPU: every Llama shape × every M.  CPU (2 cores): the two shapes the
    targets name for dequantize and M = 1, the smaller weight for the rest."""
    want = set(cases or ALL_CASES)
    out: list[Case] = []
    if quick:
        big = shapes or [(256, 512), (512, 384)]
        small = big[:1]
        m_all = ms or [1, 16]
        m_big = [1]
    elif device == "cuda":
        big = shapes or list(rl.LLAMA_SHAPES)
        small = big
        m_all = ms or [1, 16, 64, 256, 4096]  # 16 and 64: the ends of issue 4's "M = 16...64" target
        m_big = m_all
    else:
        big = shapes or [(4096, 4096), (4096, 14336)]
        small = big[:1]
        m_all = ms or [1, 16, 256]
        m_big = [1]
    if "quantize_4bit" in want:
        for (N, K) in (big if device == "cuda" or quick else small):
            out.append(Case("quantize_4bit", N, K, nested=True, variant="api"))
            out.append(Case("quantize_4bit", N, K, nested=False, variant="op"))
    if "dequantize_4bit" in want:
        for (N, K) in big:
            out.append(Case("dequantize_4bit", N, K, nested=True))
            out.append(Case("dequantize_4bit", N, K, nested=False))
    if "matmul_4bit" in want:
        for (N, K) in big:
            for M in (m_all if (N, K) in small else m_big):
                out.append(Case("matmul_4bit", N, K, M))
    lora_ms = m_all if (device == "cuda" or quick) else [16]
    if "matmul_4bit_lora" in want:
        for (N, K) in small:
            for M in lora_ms:
                out.append(Case("matmul_4bit_lora", N, K, M))
    if "backward_input" in want:
        for (N, K) in small:
            for M in lora_ms:
                out.append(Case("backward_input", N, K, M))
    if "lora_layer_fwd_bwd" in want:
        layer_ms = ([16, 4096] if device == "cuda" and not quick else lora_ms[-1:])
        for (N, K) in small:
            for M in layer_ms:
                if M is not None:
                    out.append(Case("lora_layer_fwd_bwd", N, K, M))
    if device == "cuda" and not quick:
        # The issues' targets first: a time budget that runs out cuts the least telling cases.
        out.sort(key=lambda c: (0 if is_headline(c) else 1))
    return out


def is_headline(c: Case) -> bool:
    """Cases the GPU targets of issues 3/4 name (4096×14336 weight, either orientation)."""
    big = c.N * c.K == 4096 * 14336
    return big and ((c.kind == "dequantize_4bit" and c.nested)
                    or (c.kind == "matmul_4bit" and c.M in (1, 16, 64))
                    or (c.kind in ("matmul_4bit_lora", "backward_input", "lora_layer_fwd_bwd") and c.M == 4096))


# ---------------------------------------------------------------- ceilings
def measure_ceilings(device: str, quick: bool) -> tuple[rl.Ceilings, dict]:
    """Copy bandwidth (a large copy: bytes read + written) and dense matmul rate (bf16 on
    GPU, fp32 on CPU), measured now on this machine.

    The bandwidth is the faster of a clone and a copy_ into a warm buffer: on a GPU they agree
    (the caching allocator), on a CPU a large clone mostly measures page faults of its fresh
    allocation (mmap), which is no property of the memory system.  Both are recorded."""
    dev = torch.device(device)
    if dev.type == "cuda":
        nbytes = (64 if quick else 1024) * 2**20
        n_mm, mm_dtype = (1024 if quick else 8192), torch.bfloat16
    else:
        nbytes = (16 if quick else 256) * 2**20
        n_mm, mm_dtype = (256 if quick else 2048), torch.float32
    src = torch.randn(nbytes // 4, device=dev)  # random, never zeros (METHOD.md)
    t_clone = bench(lambda: src.clone(), dev, flush_l2=False)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), dev, flush_l2=False)
    a = torch.randn(n_mm, n_mm, device=dev, dtype=mm_dtype)
    b = torch.randn(n_mm, n_mm, device=dev, dtype=mm_dtype)
    t_mm = bench(lambda: a @ b, dev, flush_l2=False)
    bw = 2 * nbytes / min(t_clone.median_s, t_copy.median_s)
    rate = 2 * n_mm**3 / t_mm.median_s
    info = {
        "copy_bw_clone_Bps": 2 * nbytes / t_clone.median_s, "copy_bw_copy__Bps": 2 * nbytes / t_copy.median_s, "copy_nbytes": nbytes,
        "matmul_rate_flops": rate, "matmul_n": n_mm, "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    return rl.Ceilings(f"{name} (measured)", bw, rate, "measured in this run"), info


# ---------------------------------------------------------------- helpers
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().double().flatten(), ref.detach().double().flatten()
    den = r.norm().item()
    return (o - r).norm().item() / den if den > 0 else (o - r).norm().item()


def git_commit() -> Optional[str]:
    env = os.environ.get("NF4KIT_GIT_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def backends_for(device: str, requested: Optional[list[str]]) -> list[str]:
    """Backends that serve `device`.  On a CPU the Triton interpreter is excluded unless
    asked for by name (it runs kernels in Python: its times mean nothing)."""
    from nf4kit import backends as B

    out = []
    for b in B.available_backends():
        mod = B.get(b)
        if not mod.serves(torch.device(device)):
            continue
        if requested is not None and b not in requested:
            continue
        if requested is None and device == "cpu" and b == "triton":
            continue
        out.append(b)
    return out


@dataclasses.dataclass
class Impl:
    """One timed implementation of a case: ours under a backend, or an anchor."""

    name: str
    fn: Optional[Callable[[], object]]
    kind: str                      # "nf4kit" | "anchor"
    backend: Optional[str] = None  # forced backend (nf4kit rows)
    ops: tuple[str, ...] = ()      # ops whose last_backend must equal `backend`
    work: Optional[rl.Work] = None
    reason: str = ""               # why fn is None


class Runner:
    def __init__(self, device: str, quick: bool, backends: list[str], act_dtype: torch.dtype,
                 w_dtype: torch.dtype, ceil: rl.Ceilings, budget_s: Optional[float], verbose: bool = True) -> None:
        self.device = device
        self.dev = torch.device(device)
        self.quick = quick
        self.backends = backends
        self.act_dtype = act_dtype
        self.w_dtype = w_dtype
        self.ceil = ceil
        self.clone_bw: Optional[float] = None  # set by main: the clone bandwidth (CPU: page faults)
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.verbose = verbose
        self._weights: dict = {}
        self.rows: list[dict] = []
        self.timing_kw = (dict(warmup_ms=2.0, rep_ms=10.0, min_reps=2, max_reps=10) if quick else
                          dict(warmup_ms=10.0, rep_ms=60.0, min_reps=5, max_reps=200) if device == "cuda" else
                          dict(warmup_ms=50.0, rep_ms=400.0, min_reps=3, max_reps=50))
        self.gen = torch.Generator(device="cpu").manual_seed(1234)

    # inputs -----------------------------------------------------------
    def randn(self, *shape, dtype=None, scale=1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float32) * scale
        return t.to(device=self.dev, dtype=dtype or self.act_dtype)

    def weight(self, N: int, K: int, nested: bool):
        """(W dense in w_dtype, packed, QuantState), quantized once by nf4kit's default backend."""
        import nf4kit

        key = (N, K, nested)
        if key not in self._weights:
            Wkey = ("W", N, K)
            if Wkey not in self._weights:
                self._weights[Wkey] = self.randn(N, K, dtype=self.w_dtype, scale=0.02)
            W = self._weights[Wkey]
            packed, qs = nf4kit.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")
            self._weights[key] = (W, packed, qs)
        return self._weights[key]

    def lora(self, N: int, K: int):
        key = ("lora", N, K)
        if key not in self._weights:
            A = self.randn(LORA_R, K, scale=1.0 / math.sqrt(K))
            B = self.randn(N, LORA_R, scale=0.01)
            self._weights[key] = (A, B)
        return self._weights[key]

    # cases ------------------------------------------------------------
    def impls(self, case: Case) -> tuple[list[Impl], Optional[Callable[[], torch.Tensor]]]:
        """Implementations of `case` and a thunk giving the torch-backend reference output."""
        import nf4kit
        from nf4kit import ops
        from nf4kit.format import packed_as_bytes

        N, K, M = case.N, case.K, case.M
        ad = self.act_dtype
        out: list[Impl] = []

        def ours(fn, ops_: tuple[str, ...], work: rl.Work) -> None:
            for b in self.backends:
                def run(fn=fn, b=b):
                    with nf4kit.use_backend(b):
                        return fn()
                out.append(Impl(f"nf4kit[{b}]", run, "nf4kit", b, ops_, work))

        def anchor(pair, work: Optional[rl.Work]) -> None:
            fn, name = pair
            out.append(Impl(name if fn is not None else f"anchor n/a: {name}", fn, "anchor", work=work,
                            reason="" if fn is not None else name))

        def torch_ref(fn):
            def run():
                with nf4kit.use_backend("torch"):
                    return fn()
            return run

        if case.kind == "quantize_4bit":
            W = self.weight(N, K, case.nested)[0]
            work = rl.quantize_4bit_work(N * K, W.dtype, BLOCKSIZE, case.nested)
            if case.variant == "api":
                fn = (lambda: nf4kit.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=case.nested))
                ours(fn, ("quantize_4bit",), work)
            else:  # the kernel alone, without the API's NaN scan
                flat = W.reshape(-1)
                fn = (lambda: ops.quantize_4bit(flat, BLOCKSIZE, "nf4"))
                ours(fn, ("quantize_4bit",), work)
            anchor(anc.bnb_quantize(W, case.nested), work)
            return out, None  # the quantizers' bits are checked by the test suite

        if case.kind == "dequantize_4bit":
            W, packed, qs = self.weight(N, K, case.nested)
            work = rl.dequantize_4bit_work(N * K, qs.dtype, BLOCKSIZE, case.nested)
            fn = (lambda: nf4kit.dequantize_4bit(packed, qs))
            ours(fn, ("dequantize_4bit",), work)
            anchor(anc.bnb_dequantize(packed, qs), work)
            return out, torch_ref(fn)

        W, packed, qs = self.weight(N, K, True)
        A, B = self.lora(N, K)
        s = LORA_SCALE
        if case.kind == "matmul_4bit":
            x = self.randn(M, K)
            work = rl.matmul_4bit_work(M, N, K, ad, BLOCKSIZE, True)
            fn = (lambda: nf4kit.matmul_4bit(x, packed, qs))
            ours(fn, ("matmul_4bit",), work)
            anchor(anc.bnb_matmul(x, packed, qs), work)
            for dt in (torch.float32, torch.bfloat16):
                anchor(anc.dense_linear(x, W, dt), rl.dense_linear_work(M, N, K, dt))
            return out, torch_ref(fn)

        if case.kind == "matmul_4bit_lora":
            x = self.randn(M, K)
            work = rl.matmul_4bit_work(M, N, K, ad, BLOCKSIZE, True, r=LORA_R)
            fn = (lambda: nf4kit.matmul_4bit(x, packed, qs, lora_A=A, lora_B=B, lora_scale=s))
            ours(fn, ("matmul_4bit",), work)
            anchor(anc.bnb_matmul_lora(x, packed, qs, A, B, s), work)
            for dt in (torch.float32, torch.bfloat16):
                anchor(anc.dense_linear_lora(x, W, A, B, s, dt), rl.dense_linear_work(M, N, K, dt)
                       + rl.lora_work(M, N, K, LORA_R, dt))
            return out, torch_ref(fn)

        if case.kind == "backward_input":
            dy = self.randn(M, N)
            pb = packed_as_bytes(packed)
            sargs = ops.state_args(qs)
            work = rl.backward_input_work(M, N, K, ad, BLOCKSIZE, True, r=LORA_R)
            fn = (lambda: ops.matmul_4bit_backward_input(dy, pb, *sargs, qs.blocksize, qs.quant_type, N, K, A, B, s))
            ours(fn, ("matmul_4bit_backward_input",), work)
            anchor(anc.bnb_backward_input(dy, packed, qs, A, B, s), work)
            for dt in (torch.float32, torch.bfloat16):
                anchor(anc.dense_backward_input(dy, W, A, B, s, dt), rl.dense_linear_work(M, K, N, dt)
                       + rl.lora_work(M, K, N, LORA_R, dt))
            return out, torch_ref(fn)

        if case.kind == "lora_layer_fwd_bwd":
            x = self.randn(M, K)
            dy = self.randn(M, N)
            work = rl.lora_layer_fwd_bwd_work(M, N, K, LORA_R, ad, BLOCKSIZE, True)
            xr = x.clone().requires_grad_(True)
            Ar = A.clone().requires_grad_(True)
            Br = B.clone().requires_grad_(True)

            def fn():
                xr.grad = Ar.grad = Br.grad = None
                y = nf4kit.matmul_4bit(xr, packed, qs, lora_A=Ar, lora_B=Br, lora_scale=s)
                y.backward(dy)
                return xr.grad

            ours(fn, ("matmul_4bit", "matmul_4bit_backward_input"), work)
            if self.dev.type == "cuda":
                anchor(anc.peft_bnb_lora_layer_fwd_bwd(x, W, LORA_R, LORA_ALPHA, dy), work)
            else:
                anchor((None, "PEFT+bnb layer: GPU only"), None)
            anchor(anc.dense_lora_layer_fwd_bwd(x, W, A, B, s, dy), None)
            return out, torch_ref(fn)
        raise ValueError(case.kind)

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

    def run_case(self, case: Case) -> list[dict]:
        from nf4kit import backends as B

        rows: list[dict] = []
        base = dict(case=case.kind, label=case.label, N=case.N, K=case.K, M=case.M, nested=case.nested,
                    variant=case.variant, act_dtype=str(self.act_dtype).replace("torch.", ""),
                    w_dtype=str(self.w_dtype).replace("torch.", ""))
        if self.over_budget():
            return [dict(base, impl="(all)", kind="skipped", error=f"time budget {self.budget_s:.0f} s spent")]
        try:
            impls, ref_fn = self.impls(case)
        except Exception as e:
            return [dict(base, impl="(setup)", kind="error", error=f"{type(e).__name__}: {e}",
                         trace=traceback.format_exc(limit=4))]
        ref = None
        if ref_fn is not None:
            try:
                ref = ref_fn()
                synchronize(self.dev)
            except Exception as e:
                ref = None
                rows.append(dict(base, impl="torch reference", kind="error", error=f"{type(e).__name__}: {e}"))
        for im in impls:
            row = dict(base, impl=im.name, kind=im.kind, backend=im.backend)
            if im.fn is None:
                row.update(time_s=None, error=None, note=im.reason)
                rows.append(row)
                continue
            if self.over_budget():
                row.update(time_s=None, error=f"time budget {self.budget_s:.0f} s spent")
                rows.append(row)
                continue
            try:
                for op in im.ops:
                    B.last_backend.pop(op, None)
                result = im.fn()
                synchronize(self.dev)
                if im.kind == "nf4kit":
                    served = {op: B.last_backend.get(op) for op in im.ops}
                    row["served_by"] = ",".join(sorted({str(v) for v in served.values()}))
                    row["fell_back"] = any(v != im.backend for v in served.values())
                    if ref is not None and isinstance(result, torch.Tensor):
                        row["rel_err_vs_torch"] = rel_err(result, ref)
                t: Timing = bench(im.fn, self.dev, prewarmed=True, **self.timing_kw)
                row.update(time_s=t.median_s, time_min_s=t.min_s, time_max_s=t.max_s, reps=t.reps, host_s=t.host_s)
                if im.work is not None:
                    w = im.work
                    row.update(bytes=w.bytes, flops=w.flops, floor_s=w.floor_s(self.ceil), bound=w.bound(self.ceil),
                               GBps=w.bytes / t.median_s / 1e9, TFLOPs=w.flops / t.median_s / 1e12)
                    row["frac_ceiling"] = ((w.bytes / t.median_s) / self.ceil.copy_bw if row["bound"] == "memory"
                                           else (w.flops / t.median_s) / self.ceil.matmul_rate)
                    row["x_floor"] = t.median_s / row["floor_s"] if row["floor_s"] > 0 else None
                    if self.clone_bw:
                        row["frac_clone"] = (w.bytes / t.median_s) / self.clone_bw
                row["error"] = None
            except Exception as e:
                row.update(time_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append(row)
        # ratio of every nf4kit row against every anchor that ran: anchor_time / our_time (> 1: we win)
        anchor_times = {r["impl"]: r["time_s"] for r in rows if r["kind"] == "anchor" and r.get("time_s")}
        for r in rows:
            if r["kind"] == "nf4kit":
                r["vs_anchor"] = {a: (ta / r["time_s"] if r.get("time_s") else None) for a, ta in anchor_times.items()}
        return rows

    def run(self, cases: list[Case]) -> list[dict]:
        for i, c in enumerate(cases):
            t = time.perf_counter()
            rows = self.run_case(c)
            self.rows.extend(rows)
            if self.verbose:
                best = [r for r in rows if r["kind"] == "nf4kit" and r.get("time_s")]
                msg = " ".join(f"{r['impl']}={rl.format_time(r['time_s'])}" for r in best)
                print(f"[{i + 1}/{len(cases)}] {c.label}: {msg} ({time.perf_counter() - t:.1f} s)", flush=True)
            # free the big per-case temporaries before the next case (GPU memory)
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        return self.rows


# ---------------------------------------------------------------- output
def _fmt(v, spec: str, na: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return na
    return format(v, spec)


def short_anchor(name: str) -> str:
    """'bnb 0.50.2 dequantize_4bit' -> 'bnb'; 'torch F.linear bf16 dense' -> 'bf16 dense'."""
    if name.startswith("bnb"):
        return "bnb"
    if name.startswith("PEFT"):
        return "PEFT+bnb"
    for dt in ("fp32", "bf16", "fp16", "float32", "bfloat16"):
        if dt in name:
            return f"{dt} dense"
    return name


def markdown(rows: list[dict], meta: dict) -> str:
    c = meta["ceilings"]
    lines = [
        f"## nf4kit benchmarks — {meta['device_name']} ({meta['device']})",
        "",
        f"date {meta['date']}, commit {meta.get('git_commit') or 'unknown'}, torch {meta['torch']}, "
        f"triton {meta.get('triton')}, bitsandbytes {meta.get('bitsandbytes') or 'n/a'}"
        f"{' (stock kernels)' if meta.get('bitsandbytes_stock') else ''}, "
        f"activations {meta['act_dtype']}, weight {meta['w_dtype']}, blocksize {BLOCKSIZE}, LoRA r={LORA_R}.",
        f"Ceilings measured in this run: copy {c['copy_bw_Bps'] / 1e9:.1f} GB/s ("
        f"{meta['ceiling_info']['copy_nbytes'] >> 20} MiB, read+write; clone "
        f"{meta['ceiling_info']['copy_bw_clone_Bps'] / 1e9:.1f} GB/s, copy_ into a warm buffer "
        f"{meta['ceiling_info']['copy_bw_copy__Bps'] / 1e9:.1f} GB/s), "
        f"matmul {c['matmul_rate_flops'] / 1e12:.2f} TFLOP/s ({meta['ceiling_info']['matmul_dtype']} "
        f"{meta['ceiling_info']['matmul_n']}³).",
        "",
        "`%ceil`: achieved over the measured ceiling of the bound (memory: GB/s over copy; compute: "
        "TFLOP/s over matmul). `%clone`: GB/s over the clone bandwidth (an allocating copy; on a CPU "
        "it includes the page faults of a fresh output, as every op that returns a new tensor does). "
        "`×floor`: time over the roofline floor. `vs anchors`: anchor time / our time (> 1 = nf4kit "
        "faster). `err`: relative error vs the torch backend. `time` on a GPU is device time (a spin "
        "kernel queued before each start event hides the host); `host`: CPU time to enqueue one call "
        "(Python and launches; paid per call unless the calls are captured in a CUDA graph).",
        "",
        "| case | impl | ran on | time | host | GB/s | TFLOP/s | %ceil | %clone | floor | ×floor | vs anchors | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] in ("skipped", "error") and r["impl"] in ("(all)", "(setup)", "torch reference"):
            lines.append(f"| {r['label']} | {r['impl']} | | {r['kind']}: {r.get('error')} | | | | | | | | | |")
            continue
        t = r.get("time_s")
        if t is None:
            status = r.get("error") or r.get("note") or "n/a"
            lines.append(f"| {r['label']} | {r['impl']} | | n/a ({status}) | | | | | | | | | |")
            continue
        ran = r.get("served_by", "") if r["kind"] == "nf4kit" else "anchor"
        if r.get("fell_back"):
            ran = f"**fell back: {ran}**"
        vs = ""
        if r["kind"] == "nf4kit":
            vs = ", ".join(f"{short_anchor(a)} {_fmt(v, '.2f')}×" for a, v in (r.get("vs_anchor") or {}).items())
        pct = r.get("frac_ceiling")
        lines.append(
            f"| {r['label']} | {r['impl']} | {ran} | {rl.format_time(t)} | "
            f"{rl.format_time(r['host_s']) if r.get('host_s') else ''} | {_fmt(r.get('GBps'), '.1f', '')} | "
            f"{_fmt(r.get('TFLOPs'), '.3f', '')} | {_fmt(None if pct is None else 100 * pct, '.0f', '')}"
            f"{'%' if pct is not None else ''} | "
            f"{_fmt(100 * r['frac_clone'], '.0f', '') + '%' if r.get('frac_clone') and r.get('bound') == 'memory' else ''}"
            f" | {rl.format_time(r.get('floor_s')) if r.get('floor_s') else ''} | "
            f"{_fmt(r.get('x_floor'), '.1f', '')} | {vs} | {_fmt(r.get('rel_err_vs_torch'), '.1e', '')} |")
    anchors_missing = sorted({r.get("note") for r in rows if r["kind"] == "anchor" and r.get("time_s") is None
                              and r.get("note")})
    if anchors_missing:
        lines += ["", "Anchors not available: " + "; ".join(anchors_missing)]
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> list[str]:
    """A few headline numbers (for the end of gpu_check's output)."""
    out = []
    for r in rows:
        if r["kind"] != "nf4kit" or not r.get("time_s"):
            continue
        vs = r.get("vs_anchor") or {}
        best = ", ".join(f"{short_anchor(a)} {v:.2f}×" for a, v in vs.items() if v)
        out.append(f"{r['label']:<40} {r['impl']:<14} {rl.format_time(r['time_s']):>10} "
                   f"{100 * (r.get('frac_ceiling') or 0):5.0f}%ceil  {best}")
    return out


def collect_meta(device: str, ceil: rl.Ceilings, info: dict, args) -> dict:
    import nf4kit

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    dev = torch.device(device)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        f"{platform.processor() or platform.machine()} ×{os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "bitsandbytes": anc.bnb_version(),
        "bitsandbytes_error": anc.bnb_error(),
        "bitsandbytes_stock": anc.stock_bitsandbytes(),  # its own kernels, not nf4kit's (anchors.py)
        "python": platform.python_version(),
        "build_info": nf4kit.build_info(),
        "backends": args.backends_resolved,
        "act_dtype": str(args.act_dtype_t).replace("torch.", ""),
        "w_dtype": str(args.w_dtype_t).replace("torch.", ""),
        "quick": args.quick,
        "ceilings": {"copy_bw_Bps": ceil.copy_bw, "matmul_rate_flops": ceil.matmul_rate},
        "ceiling_info": info,
        "nominal_h100": dataclasses.asdict(rl.H100),
    }


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _shape_list(s: Optional[str]) -> Optional[list[tuple[int, int]]]:
    if not s:
        return None
    return [tuple(int(v) for v in p.lower().split("x")) for p in s.split(",")]  # type: ignore[misc]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--json", default=None, help="write all rows + metadata here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke test)")
    p.add_argument("--backends", default=None, help="comma list (default: every backend serving the device)")
    p.add_argument("--cases", default=None, help=f"comma list of {','.join(ALL_CASES)}")
    p.add_argument("--shapes", default=None, help="weights N×K, e.g. 4096x4096,14336x4096")
    p.add_argument("--m", default=None, help="comma list of M")
    p.add_argument("--act-dtype", default=None, help="activations: default bf16 on cuda, fp32 on cpu")
    p.add_argument("--w-dtype", default="bf16", help="dtype of the weight before quantization (qs.dtype)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many s")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device == "cpu" and torch.cuda.is_available() is False:
        # the Triton interpreter is only for tests; never import it for timings by accident
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    import nf4kit  # noqa: F401  (after the env is settled)

    args.act_dtype_t = _DTYPES[args.act_dtype] if args.act_dtype else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    args.w_dtype_t = _DTYPES[args.w_dtype]
    requested = args.backends.split(",") if args.backends else None
    args.backends_resolved = backends_for(device, requested)
    cases = plan(device, args.quick, _shape_list(args.shapes), [int(v) for v in args.m.split(",")] if args.m else None,
                 args.cases.split(",") if args.cases else None)
    print(f"benchmarks.run: device {device}, backends {args.backends_resolved}, {len(cases)} cases, "
          f"bitsandbytes {anc.bnb_version() or 'n/a'}", flush=True)
    ceil, info = measure_ceilings(device, args.quick)
    print(f"ceilings: copy {ceil.copy_bw / 1e9:.1f} GB/s (clone {info['copy_bw_clone_Bps'] / 1e9:.1f}, copy_ into a "
          f"warm buffer {info['copy_bw_copy__Bps'] / 1e9:.1f} GB/s), matmul {ceil.matmul_rate / 1e12:.3f} TFLOP/s "
          f"({info['matmul_dtype']})", flush=True)
    runner = Runner(device, args.quick, args.backends_resolved, args.act_dtype_t, args.w_dtype_t, ceil, args.budget_s)
    runner.clone_bw = info["copy_bw_clone_Bps"]
    try:
        rows = runner.run(cases)
    except KeyboardInterrupt:  # gpu_check's stage timeout sends SIGINT: keep what was measured
        print("benchmarks.run: interrupted; writing the rows measured so far", flush=True)
        rows = runner.rows
    meta = collect_meta(device, ceil, info, args)
    md = markdown(rows, meta)
    print()
    print(md)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
