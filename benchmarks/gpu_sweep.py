"""Sweeps of the cuda backend's decode GEMV (rows per warp x load-ring depth x K-splits) and
small-M fused GEMM (splits), and of the Triton M = 1 configs (including two K-steps in flight),
on the headline weight (4096x14336 NF4, blocksize 64, double quant, bf16), L2 flushed before
every call.  Prints one line per setting: the time and the heuristic's choice, so the routing
constants can be set from measurements.  GPU only:
  [SWEEP=flush,depth|stream,gemv,gemm,gemm64t,cluster,floor,m1,triton|triton-stream,bnb-backend]
python -m benchmarks.gpu_sweep
"""
from __future__ import annotations

import os

import torch

import nf4kit
from nf4kit.backends import cuda as cb

from ._settings import settings
from ._timing import bench


def point(label: str, x, packed, qs, exp, dev) -> None:
    """Time nf4kit.matmul_4bit(x) under the current settings and print one line (time, host
    time, error vs `exp`); an exception is printed, not raised: a sweep point is not a test."""
    try:
        y = nf4kit.matmul_4bit(x, packed, qs)
        err = ((y.float() - exp).norm() / exp.norm()).item()
        t = bench(lambda: nf4kit.matmul_4bit(x, packed, qs), dev)
        print(f"{label}: {t.median_s * 1e6:8.1f} us  host {t.host_s * 1e6:6.1f} us  rel_err {err:.1e}", flush=True)
    except Exception as e:
        print(f"{label}: {type(e).__name__}: {e}", flush=True)


def flush_modes(packed, qs, W, dev) -> None:
    """M = 1 decode and dequantize under both L2-flush modes, with bitsandbytes and cuBLAS."""
    from . import _timing
    from . import anchors as anc

    x = torch.randn(1, W.shape[1], device=dev, dtype=torch.bfloat16)
    impls = []
    for b in ("cuda", "triton"):
        def ours(b=b):
            with nf4kit.use_backend(b):
                return nf4kit.matmul_4bit(x, packed, qs)
        impls.append((f"nf4kit[{b}] M=1", ours))
    fn, name = anc.bnb_matmul(x, packed, qs)
    if fn is not None:
        impls.append((name + " M=1", fn))
    impls.append(("cuBLAS bf16 dense M=1", lambda: torch.nn.functional.linear(x, W)))
    for b in ("cuda", "triton"):
        def deq(b=b):
            with nf4kit.use_backend(b):
                return nf4kit.dequantize_4bit(packed, qs)
        impls.append((f"nf4kit[{b}] dequantize", deq))
    for mode in ("zero", "read"):
        _timing.FLUSH_MODE = mode
        for name, f in impls:
            t = bench(f, dev)
            print(f"flush={mode:4s} {name:40s} {t.median_s * 1e6:8.1f} us  host {t.host_s * 1e6:6.1f} us", flush=True)
    _timing.FLUSH_MODE = "read"


def depth_sweep(packed, qs, W_ref, dev, rows_too: bool = True) -> None:
    """M = 1 GEMV on this weight and on its transpose's shape (N = 14336, K = 4096: the gate/up
    projections): the committed default, the memory-order stream kernel, its tensor-core variant,
    and (rows_too) the row kernel's rows per warp x load-ring depth x K-splits."""
    N, K = W_ref.shape
    Wt = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    packed_t, qs_t = nf4kit.quantize_4bit(Wt, blocksize=64, compress_statistics=True)
    Wt_ref = nf4kit.dequantize_4bit(packed_t, qs_t).float()
    default = (cb.GEMV_ROWS, cb.GEMV_DEPTH, cb.GEMV_SPLITS)
    # Floors for a read of this size (~30 MB, L2 flushed): is the M = 1 plateau the decode or the read?
    words = packed.reshape(-1).view(torch.int32)
    dst = torch.empty_like(packed)
    for label, fn in (("torch sum over the packed weight (read only)", lambda: words.sum()),
                      ("torch copy of the packed weight (read + write)", lambda: dst.copy_(packed))):
        t = bench(fn, dev)
        nbytes = packed.numel() * (1 if "sum" in label else 2)
        print(f"read floor: {label}: {t.median_s * 1e6:8.1f} us  {nbytes / t.median_s / 1e9:6.0f} GB/s", flush=True)
    with nf4kit.use_backend("cuda"):
        for shape, (p, q, ref) in ((f"{N}x{K}", (packed, qs, W_ref)), (f"{K}x{N}", (packed_t, qs_t, Wt_ref))):
            x = torch.randn(1, ref.shape[1], device=dev, dtype=torch.bfloat16)
            exp = x.float() @ ref.t()
            kernel = cb._gemv_kernel(1, ref.shape[0], ref.shape[1], x.dtype, 64)
            mma_kind = (f"tensor-core stream, depth {cb.GEMV_MMA_DEPTH}"
                        + (", block reduce" if cb.GEMV_MMA_BLOCK_REDUCE else "")
                        + (", pdl finalize" if cb.GEMV_PDL else ""))
            kind = {"mma": mma_kind,
                    "stream": f"stream, depth {cb.GEMV_STREAM_DEPTH}"}.get(
                kernel, f"rows {default[0]}, depth {default[1]}, heuristic S")
            point(f"cuda M=1 {shape} default ({kind})", x, p, q, exp, dev)
            # Every point below names its options: the block reduce and the PDL finalize (on by default
            # since results/gpu_h100_2026-11-27c) are off unless a point turns them on.
            with settings(cb, GEMV_MMA_BLOCK_REDUCE=False, GEMV_PDL=False):
                with settings(cb, GEMV_STREAM=False, GEMV_MMA=False):
                    point(f"cuda M=1 {shape} row kernel (rows {default[0]}, depth {default[1]}, heuristic S)", x, p, q,
                          exp, dev)
                # The memory-order stream kernel: is the plateau the order in which W is read?
                for depth in (4, 8):
                    with settings(cb, GEMV_STREAM=True, GEMV_MMA=False, GEMV_STREAM_DEPTH=depth):
                        point(f"cuda M=1 {shape} stream depth={depth}", x, p, q, exp, dev)
                # The tensor-core stream kernel, both load rings.
                for depth in (2, 3):
                    with settings(cb, GEMV_MMA=True, GEMV_MMA_DEPTH=depth):
                        point(f"cuda M=1 {shape} mma depth={depth} (tensor-core stream)", x, p, q, exp, dev)
                # Each block sums its warps' K-tiles (the default): no finalize at K = 4096, 4 slices at 14336.
                for depth in (2, 3):
                    with settings(cb, GEMV_MMA=True, GEMV_MMA_DEPTH=depth, GEMV_MMA_BLOCK_REDUCE=True):
                        point(f"cuda M=1 {shape} mma depth={depth} block reduce", x, p, q, exp, dev)
                # The finalize on a programmatic dependent launch (the default on sm_90+): after the plain
                # kernel and the block-reduced kernel (which has no finalize at K = 4096).
                for label, values in (("mma", {}), ("mma block reduce", dict(GEMV_MMA_BLOCK_REDUCE=True)),
                                      ("mma depth=3 block reduce", dict(GEMV_MMA_BLOCK_REDUCE=True, GEMV_MMA_DEPTH=3))):
                    with settings(cb, GEMV_MMA=True, GEMV_PDL=True, **values):
                        point(f"cuda M=1 {shape} {label} pdl finalize", x, p, q, exp, dev)
                # M = 4 and 8: the row kernel against the tensor-core batch kernel (one decode per batch
                # row); M = 12 and 16: the fused GEMM against its two-n-tile form.
                for M in (4, 8, 12, 16):
                    xm = torch.randn(M, ref.shape[1], device=dev, dtype=torch.bfloat16)
                    em = xm.float() @ ref.t()
                    with settings(cb, GEMV_MMA=False):
                        point(f"cuda M={M} {shape} {'row kernel' if M <= 8 else 'fused GEMM'}", xm, p, q, em, dev)
                    for depth in ((2, 3) if M > 8 else (cb.GEMV_MMA_DEPTH,)):
                        with settings(cb, GEMV_MMA=True, GEMV_MMA_DEPTH=depth):
                            point(f"cuda M={M} {shape} mma batch depth={depth} (tensor cores)", xm, p, q, em, dev)
                    if M == 16:
                        with settings(cb, GEMV_MMA=True, GEMV_PDL=True):
                            point(f"cuda M={M} {shape} mma batch pdl finalize", xm, p, q, em, dev)
                # M = 32 and 64: the fused GEMM against the table GEMM (the default on sm_90), the heuristic's splits.
                for M in (32, 64):
                    xm = torch.randn(M, ref.shape[1], device=dev, dtype=torch.bfloat16)
                    em = xm.float() @ ref.t()
                    # compact: the table GEMM with twice the warps an SM (the default at M <= 32 on sm_90),
                    # at its own splits heuristic.  2026-11-27d: at the 8-warp kernel's splits it was no
                    # faster than that kernel, and M = 64 as two 32-row calls 11-14 us slower than one.
                    for on, pdl, compact in ((False, False, False), (True, False, False), (True, True, False),
                                             (True, True, True)):
                        with settings(cb, GEMV_MMA_GEMM=on, GEMV_PDL=pdl, GEMV_MMA_GEMM_COMPACT=compact):
                            label = "table GEMM (tensor cores)" if on else "fused GEMM"
                            label += " compact" if compact else ""
                            label += " pdl finalize" if pdl else ""
                            if compact:
                                print(f"heuristic: compact table GEMM splits M={M} {shape}: "
                                      f"{cb._gemv_split_count(M, em.shape[1], xm.shape[1], xm.dtype, 64, dev)}",
                                      flush=True)
                            point(f"cuda M={M} {shape} {label}", xm, p, q, em, dev)
                    if M == 32:  # the compact default around its heuristic's splits: does a second, part-full
                        # wave of smaller blocks beat one wave with empty slots (14336x4096: 224 of 264)?
                        S = cb._gemv_split_count(M, em.shape[1], xm.shape[1], xm.dtype, 64, dev)
                        tiles = xm.shape[1] // 256
                        for splits in sorted({max(1, S - 1), min(tiles, S + 1), min(tiles, 2 * S)} - {S}):
                            with settings(cb, GEMV_MMA_GEMM=True, GEMV_PDL=True, GEMM_MMA_SPLITS=splits):
                                point(f"cuda M={M} {shape} table GEMM compact pdl finalize splits={splits} "
                                      f"(heuristic {S})", xm, p, q, em, dev)
            if rows_too:
                with settings(cb, GEMV_STREAM=False, GEMV_MMA=False):
                    _row_kernel_variants(shape, x, p, q, exp, dev)


def square_m64(dev) -> None:
    """M = 64 on a 4096x4096 weight (1.52x bitsandbytes in 27d, the one table-GEMM shape short of 2x
    at M = 64): the 8-warp default against the compact 16-warp form, which lost on the two long
    shapes (W decoded twice) but has never run on this short one, and the fused GEMM."""
    W = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    p, q = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    ref = nf4kit.dequantize_4bit(p, q).float()
    xm = torch.randn(64, 4096, device=dev, dtype=torch.bfloat16)
    em = xm.float() @ ref.t()
    S = cb._gemv_split_count(64, 4096, 4096, xm.dtype, 64, dev)
    for label, values in (("table GEMM (default)", {}), ("table GEMM compact", dict(GEMV_MMA_GEMM_COMPACT=True)),
                          ("fused GEMM", dict(GEMV_MMA_GEMM=False))):
        with settings(cb, **values):
            point(f"cuda M=64 4096x4096 {label}", xm, p, q, em, dev)
    # 32 row blocks of 128 rows: the heuristic's splits fill one wave (one 194 KB block an SM) with
    # 16 / S tiles a block, so the prologue (the 64 KB table) and the finalize weigh on few tiles.
    for splits in sorted({2, 2 * S} - {S}):
        with settings(cb, GEMM_MMA_SPLITS=splits):
            point(f"cuda M=64 4096x4096 table GEMM splits={splits} (heuristic {S})", xm, p, q, em, dev)


def cluster_sums(dev) -> None:
    """The table GEMM's K-splits summed in a thread-block cluster (GEMV_MMA_GEMM_CLUSTER: no partials,
    no finalize launch) against the finalize (PDL, the default), M = 17..64 on the three shapes, each
    form at its heuristic's splits S; and the cluster sums at 2, S / 2 and 2 S splits (at most 8): without
    a finalize launch more splits may pay, and fewer blocks per cluster fit a GPC more easily."""
    for N, K in ((4096, 14336), (14336, 4096), (4096, 4096)):
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        p, q = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
        ref = nf4kit.dequantize_4bit(p, q).float()
        for M in (17, 32, 48, 64):
            xm = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            em = xm.float() @ ref.t()
            S = cb._gemv_split_count(M, N, K, xm.dtype, 64, dev)

            def fit() -> str:  # under the current settings: do all clusters run at once (else: finalize)?
                splits = cb._gemv_split_count(M, N, K, xm.dtype, 64, dev)
                if not cb._mma_gemm_cluster(splits, dev):  # the routing's own rule (2..8 splits, sm_90+)
                    return f"S={splits}: no cluster"
                try:
                    fits = cb._mma_gemm_clusters_fit(M, N, splits, cb._mma_gemm_compact(M, dev), xm.dtype, dev)
                except Exception as e:  # a sweep point is not a test: say so and go on
                    return f"S={splits}: fit unknown ({type(e).__name__}: {e})"
                return f"S={splits}: {'clusters fit' if fits else 'clusters do not fit, finalize'}"

            for cluster in (False, True):
                with settings(cb, GEMV_MMA_GEMM_CLUSTER=cluster):
                    point(f"cuda M={M} {N}x{K} table GEMM {'cluster sums' if cluster else 'finalize'} "
                          f"({fit() if cluster else f'S={S}'})", xm, p, q, em, dev)
            for splits in sorted({2, max(2, S // 2), min(8, 2 * S)} - {S}):
                with settings(cb, GEMV_MMA_GEMM_CLUSTER=True, GEMM_MMA_SPLITS=splits):
                    point(f"cuda M={M} {N}x{K} table GEMM cluster sums splits={splits} (heuristic {S}; {fit()})", xm,
                          p, q, em, dev)
            if M > 32:  # the compact 16-warp form, faster at M = 64 on 4096x4096 alone (27e)
                with settings(cb, GEMV_MMA_GEMM_CLUSTER=True, GEMV_MMA_GEMM_COMPACT=True):
                    point(f"cuda M={M} {N}x{K} table GEMM compact cluster sums ({fit()})", xm, p, q, em, dev)


def read_floors(dev) -> None:
    """What a single cold call can reach in this harness: an empty launch (the fixed cost every
    timed call pays) and a pure read of each M = 1 weight's bytes (a Triton kernel that XOR-sums
    32-bit words, a few block shapes, the best printed), against which the GEMVs' times are read."""
    from ._read_floor import read_words

    one = torch.zeros(1, device=dev)
    t = bench(lambda: one.add_(1.0), dev)
    print(f"floor: empty launch (a 1-element add_): {t.median_s * 1e6:8.1f} us", flush=True)
    for N, K in ((4096, 14336), (14336, 4096), (4096, 4096)):
        p, _ = nf4kit.quantize_4bit(torch.randn(N, K, device=dev, dtype=torch.bfloat16), blocksize=64,
                                    compress_statistics=True)
        words = p.reshape(-1).view(torch.int32)
        n = words.numel()
        best = None
        for block, iters, warps in ((1024, 4, 4), (2048, 4, 8), (4096, 2, 8), (2048, 8, 8), (1024, 16, 4)):
            try:
                t = bench(lambda: read_words(words, block, iters, warps), dev)
            except Exception as e:  # a sweep point is not a test
                print(f"floor: read {N}x{K} BLOCK={block} ITERS={iters} warps={warps}: {type(e).__name__}: {e}")
                continue
            print(f"floor: read {N}x{K} ({words.numel() * 4 / 1e6:.1f} MB) BLOCK={block} ITERS={iters} "
                  f"warps={warps}: {t.median_s * 1e6:8.1f} us  {n * 4 / t.median_s / 1e9:6.0f} GB/s", flush=True)
            best = t.median_s if best is None else min(best, t.median_s)
        if best is not None:
            print(f"floor: read {N}x{K} best {best * 1e6:8.1f} us", flush=True)


def m1_compact(dev) -> None:
    """M = 1 on the three shapes: the block-reduced default (one 16-warp block an SM) against its
    compact form (GEMV_MMA_COMPACT: two blocks an SM in 78 KB and 64 registers, the same bits)."""
    for N, K in ((4096, 14336), (14336, 4096), (4096, 4096)):
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        p, q = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
        ref = nf4kit.dequantize_4bit(p, q).float()
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        e = x.float() @ ref.t()
        with nf4kit.use_backend("cuda"):
            for label, values in (("block reduce (default)", {}), ("compact block reduce", dict(GEMV_MMA_COMPACT=True)),
                                  ("compact block reduce, no pdl", dict(GEMV_MMA_COMPACT=True, GEMV_PDL=False))):
                with settings(cb, **values):
                    point(f"cuda M=1 {N}x{K} {label}", x, p, q, e, dev)


def _row_kernel_variants(shape, x, p, q, exp, dev) -> None:
    """The row kernel's rows per warp x ring depth x K-splits (the caller has the stream kernel off)."""
    for rows, depth in [(r, d) for r in (1, 2, 4) for d in (2, 3, 4)] + [(1, 8)]:
        for S in (1, 2, 3, 4):
            with settings(cb, GEMV_ROWS=rows, GEMV_DEPTH=depth, GEMV_SPLITS=S):
                point(f"cuda M=1 {shape} rows={rows} depth={depth} S={S}", x, p, q, exp, dev)


def bnb_backend(packed, qs, W_ref, dev) -> None:
    """bitsandbytes' own M = 1 call (bnb.matmul_4bit -> gemv_4bit) on both shapes, stock and with
    nf4kit registered as its CUDA backend (NF4KIT_BNB_BACKEND=1's route), device and host time
    (gpu_h100_2026-11-27b run1: 28.3-28.9 us device, 172-174 us host, against 32.8-34.1 and 62-65
    stock; the CUDA registration stays opt-in for the host cost)."""
    from nf4kit.integrations import bitsandbytes as nbnb

    from . import anchors as anc

    N, K = W_ref.shape
    Wt = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
    packed_t, qs_t = nf4kit.quantize_4bit(Wt, blocksize=64, compress_statistics=True)
    for shape, (p, q, ref) in ((f"{N}x{K}", (packed, qs, W_ref)),
                               (f"{K}x{N}", (packed_t, qs_t, nf4kit.dequantize_4bit(packed_t, qs_t).float()))):
        x = torch.randn(1, ref.shape[1], device=dev, dtype=torch.bfloat16)
        exp = x.float() @ ref.t()
        fn, name = anc.bnb_matmul(x, p, q)  # disables any registration: stock kernels
        if fn is None:
            print(f"bnb M=1 {shape}: {name}", flush=True)
            return
        for label in ("stock", "via nf4kit"):
            try:
                if label == "via nf4kit" and not nbnb.enable(("cuda",)):
                    print(f"bnb M=1 {shape} {label}: enable() failed", flush=True)
                    continue
                before = dict(nbnb.call_counts)
                y = fn()
                err = ((y.float() - exp).norm() / exp.norm()).item()
                t = bench(fn, dev)
                ran = {k: v - before.get(k, 0) for k, v in nbnb.call_counts.items() if v != before.get(k, 0)}
                print(f"bnb M=1 {shape} {label} ({name}): {t.median_s * 1e6:8.1f} us  host {t.host_s * 1e6:6.1f} us"
                      f"  rel_err {err:.1e}  nf4kit calls {ran}", flush=True)
            except Exception as e:
                print(f"bnb M=1 {shape} {label}: {type(e).__name__}: {e}", flush=True)
            finally:
                nbnb.disable()


def main() -> None:
    dev = torch.device("cuda")
    N, K = 4096, 14336
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    W_ref = nf4kit.dequantize_4bit(packed, qs).float()
    sections = os.environ.get("SWEEP", "flush,depth,gemv,gemm,triton").split(",")
    if "flush" in sections:
        flush_modes(packed, qs, W, dev)
    if "depth" in sections or "stream" in sections:  # stream: the floors, default and stream kernel only
        depth_sweep(packed, qs, W_ref, dev, rows_too="depth" in sections)
        square_m64(dev)
    if "cluster" in sections:
        cluster_sums(dev)
    if "floor" in sections:
        read_floors(dev)
    if "m1" in sections:
        m1_compact(dev)
    if "bnb-backend" in sections:
        bnb_backend(packed, qs, W_ref, dev)
    print(f"heuristics: gemv S={cb._gemv_splits(N, K, dev)}, gemm splits M=16 {cb._gemm_splits(16, N, K, dev)}, "
          f"M=64 {cb._gemm_splits(64, N, K, dev)}, M=256 {cb._gemm_splits(256, N, K, dev)}", flush=True)
    # The split sweeps below are the row kernel's (M = 1 included).
    with nf4kit.use_backend("cuda"), settings(cb, GEMV_STREAM=False, GEMV_MMA=False, GEMV_MMA_GEMM=False):
        for rows in ((1, 2, 8) if "gemv" in sections else ()):
            cb.GEMV_ROWS = rows
            x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
            exp = x.float() @ W_ref.t()
            for v in (1, 2, 4, 8):
                cb.GEMV_SPLITS = v
                point(f"cuda M=   1 GEMV_ROWS={rows} GEMV_SPLITS={v:3d}", x, packed, qs, exp, dev)
        cb.GEMV_ROWS, cb.GEMV_SPLITS = 4, None
        todo = ((1, "GEMV_SPLITS", (1, 2, 3, 4, 6, 8, 12)), (4, "GEMV_SPLITS", (2, 3, 4, 6)),
                (8, "GEMV_SPLITS", (2, 3, 4, 6))) if "gemv" in sections else ()
        todo += ((16, "GEMM_SPLITS", (1, 2, 4, 6, 8, 12, 16)), (64, "GEMM_SPLITS", (1, 2, 4, 8, 12)),
                 (256, "GEMM_SPLITS", (1, 2, 4))) if "gemm" in sections else ()
        for M, attr, values in todo:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            exp = x.float() @ W_ref.t()
            for v in values:
                setattr(cb, attr, v)
                point(f"cuda M={M:4d} {attr}={v:3d}", x, packed, qs, exp, dev)
            setattr(cb, attr, None)
        if "gemm64t" in sections:
            # M = 64 on the transposed shape (N = 14336, K = 4096), issue 4's open case (fused GEMM 73.1 us,
            # 1.75x bitsandbytes, at the heuristic's 2 splits): do more splits fill the SMs better?
            Wt = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
            packed_t, qs_t = nf4kit.quantize_4bit(Wt, blocksize=64, compress_statistics=True)
            x = torch.randn(64, N, device=dev, dtype=torch.bfloat16)
            exp = x.float() @ nf4kit.dequantize_4bit(packed_t, qs_t).float().t()
            print(f"heuristic: gemm splits M=64 {K}x{N}: {cb._gemm_splits(64, K, N, dev)}", flush=True)
            for v in (1, 2, 3, 4, 6, 8):
                cb.GEMM_SPLITS = v
                point(f"cuda M=  64 {K}x{N} GEMM_SPLITS={v:3d}", x, packed_t, qs_t, exp, dev)
            cb.GEMM_SPLITS = None
            # The table GEMM (the default on sm_90) at its splits, on this shape and the other.
            x_n = torch.randn(64, K, device=dev, dtype=torch.bfloat16)
            exp_n = x_n.float() @ W_ref.t()
            for label, (xs, p, q, e) in ((f"{K}x{N}", (x, packed_t, qs_t, exp)), (f"{N}x{K}", (x_n, packed, qs, exp_n))):
                print(f"heuristic: table GEMM splits M=64 {label}: "
                      f"{cb._gemv_split_count(64, e.shape[1], xs.shape[1], xs.dtype, 64, dev, 'mma-gemm')}", flush=True)
                for v in (1, 2, 3, 4, 6, 8):
                    with settings(cb, GEMV_MMA_GEMM=True, GEMM_MMA_SPLITS=v):
                        point(f"cuda M=  64 {label} table GEMM splits={v}", xs, p, q, e, dev)
    if "triton" not in sections and "triton-stream" not in sections:
        return
    from nf4kit.triton_kernels import matmul as tm

    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    exp = x.float() @ W_ref.t()
    extra = [tm._cfg(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, warps=w, stages=2)
             for bn, bk, sk, w in ((2, 4096, 1, 4), (16, 2048, 1, 8), (8, 2048, 1, 8), (32, 512, 1, 4),
                                   (8, 4096, 1, 8), (16, 1024, 1, 4), (4, 1024, 1, 4))]
    # Two K-steps of W in flight (PREFETCH=2; sm_90: 55-78 registers, no spills; the block shapes
    # with 16-row or 8x2048/4-warp tiles reach 254 registers and are left out).
    extra += [tm._cfg(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, PREFETCH=2, warps=w, stages=2)
              for bn, bk, w in ((8, 1024, 4), (4, 2048, 4), (8, 2048, 8), (4, 1024, 4))]
    with nf4kit.use_backend("triton"):
        if "triton-stream" in sections or "triton" in sections:
            # The memory-order stream kernel (the M = 1 default) on both shapes against the word
            # path; programs per SM = what the static view says fits.  The committed STREAM_CONFIG
            # first, then the runners-up of two H100 sweeps (gpu_h100_2026-11-27b run1: 22.4-25.4 us
            # against 24.7-37.6 for the 4-warp / multi-row tiles dropped here).
            Wt = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
            packed_t, qs_t = nf4kit.quantize_4bit(Wt, blocksize=64, compress_statistics=True)
            xt = torch.randn(1, N, device=dev, dtype=torch.bfloat16)
            exp_t = xt.float() @ nf4kit.dequantize_4bit(packed_t, qs_t).float().t()
            configs = [dict(tm.STREAM_CONFIG)] + [
                dict(BLOCK_N=bn, BLOCK_K=bk, warps=w, programs_per_sm=per_sm)
                for bn, bk, w, per_sm in ((2, 1024, 1, 32), (1, 2048, 1, 20), (8, 1024, 4, 5))]
            for shape, (xs, p, q, e) in ((f"{N}x{K}", (x, packed, qs, exp)), (f"{K}x{N}", (xt, packed_t, qs_t, exp_t))):
                with settings(tm, GEMV_STREAM=False):
                    point(f"triton M=1 {shape} word path (autotuned)", xs, p, q, e, dev)
                for i, cfg in enumerate(configs):  # the committed config first, labelled the default
                    # (the reduction on PDL where the device has it: tm._stream_pdl)
                    with settings(tm, GEMV_STREAM=True, STREAM_CONFIG=cfg):
                        point(f"triton M=1 {shape} stream {cfg}{' (default)' if i == 0 else ''}", xs, p, q, e, dev)
                # The default launches the reduction on PDL (STREAM_PDL, sm_90+); the ordinary launch
                # against it.  2026-11-27c: one 84.7 us outlier with PDL; 27d: PDL faster in 6 of 6.
                with settings(tm, GEMV_STREAM=True, STREAM_PDL=False):
                    point(f"triton M=1 {shape} stream, reduction without pdl", xs, p, q, e, dev)
        if "triton" not in sections:
            return
        for cfg in tm.gemv_configs(torch.cuda.get_device_capability(dev), True) + extra:
            with tm.force_config("gemv", cfg):
                point(f"triton M=1 {cfg}", x, packed, qs, exp, dev)


if __name__ == "__main__":
    main()
