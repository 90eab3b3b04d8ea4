"""do_bench-style timing: warm up, estimate, then the median of many repetitions.

GPU: CUDA events around each call, with the L2 cache flushed before every repetition (by
writing a buffer larger than L2), so that a weight which would fit in L2 (a 4096×4096 NF4
weight is 8 MiB, the H100's L2 50 MB) is read from HBM as in a real model.  A spin kernel
(torch.cuda._sleep) longer than the call's host time is queued before each start event, so
the GPU never waits for Python between the events: `median_s` is device time.  The host time
to enqueue one call (Python, validation, launches; what a decode loop without CUDA graphs
pays per layer) is reported apart, as `host_s`.
CPU: perf_counter around each call.  Nothing here asserts a time.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Timing:
    """Median / min / max seconds of `reps` timed calls."""

    median_s: float
    min_s: float
    max_s: float
    reps: int
    host_s: Optional[float] = None  # GPU: median CPU time to enqueue one call

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_flush_buf: dict[str, torch.Tensor] = {}
# How the L2 is emptied before each repetition: "read" (a reduction over 256 MiB leaves L2 full
# of clean lines, as after a model's previous layers read their weights) or "zero" (writing
# the buffer, as Triton's do_bench does: L2 is left full of dirty lines whose write-back then
# competes with the timed kernel's reads; it penalises short bandwidth-bound kernels).
FLUSH_MODE = os.environ.get("NF4KIT_BENCH_FLUSH", "read")


def _l2_flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _flush_buf:
        # 256 MiB: several times any current L2 (H100 50 MB, H200 60 MB).
        _flush_buf[key] = torch.zeros(64 * 1024 * 1024, dtype=torch.float32, device=device)
    return _flush_buf[key]


def _flush(cache: torch.Tensor) -> None:
    if FLUSH_MODE == "zero":
        cache.zero_()
    else:
        cache.sum()


def bench(fn: Callable[[], object], device: torch.device | str, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 3, max_reps: int = 200, flush_l2: bool = True, prewarmed: bool = False) -> Timing:
    """Time `fn()` on `device` (its work must run on that device).

    The first call is untimed (compilation, autotuning, allocator warm-up; skipped when the
    caller has just made it: prewarmed=True); a short estimate then sets how many warm-up calls
    fill `warmup_ms` and how many timed calls fill `rep_ms` (between min_reps and max_reps).
    Returns the median and spread of the timed calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _bench_cuda(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2, prewarmed)
    return _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, prewarmed)


def _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, prewarmed=False) -> Timing:
    if not prewarmed:
        fn()
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    times = []
    if est * 1e3 >= rep_ms / min_reps:  # slow call (seconds on 2 cores): the estimate is a sample too
        times.append(est)
    for _ in range(max(0, min(int(warmup_ms * 1e-3 / est), 50) - 1)):
        fn()
    n = max(min_reps, min(max_reps, int(rep_ms * 1e-3 / est))) - len(times)
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), len(times))


_sleep_rate: dict[str, float] = {}


def _spin_cycles_per_s(device: torch.device) -> float:
    """Clock rate of torch.cuda._sleep on this device, measured once with events."""
    key = str(device)
    if key not in _sleep_rate:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        s.record()
        torch.cuda._sleep(2_000_000)
        e.record()
        torch.cuda.synchronize()
        _sleep_rate[key] = 2_000_000 / max(s.elapsed_time(e) * 1e-3, 1e-6)
    return _sleep_rate[key]


def _bench_cuda(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2, prewarmed=False) -> Timing:
    with torch.cuda.device(device):
        if not prewarmed:
            fn()
        torch.cuda.synchronize()
        # host (enqueue) time of one call, so the spin pad can cover it
        h0 = time.perf_counter()
        fn()
        host_est = time.perf_counter() - h0
        torch.cuda.synchronize()
        pad_cycles = int(min(max(2.0 * host_est + 50e-6, 100e-6), 5e-3) * _spin_cycles_per_s(device))
        cache = _l2_flush_buffer(device) if flush_l2 else None
        # estimate: 3 calls, each after a flush
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            if cache is not None:
                _flush(cache)
            fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 3 * 1e-3, 1e-7)  # includes the flush: conservative
        for _ in range(max(1, min(int(warmup_ms * 1e-3 / est), 200))):
            fn()
        n = max(min_reps, min(max_reps, int(rep_ms * 1e-3 / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        host = []
        for i in range(n):
            if cache is not None:
                _flush(cache)
            torch.cuda._sleep(pad_cycles)  # the GPU is still busy when fn's launches arrive
            starts[i].record()
            h0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - h0)
            ends[i].record()
            if (i & 7) == 7:
                torch.cuda.synchronize()  # keep the queue short: no launch ever blocks on a full queue
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), min(times), max(times), n, statistics.median(host))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
