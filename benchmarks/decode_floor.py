"""What an M = 1 decode can reach in this harness, read off the dense anchors of the same run.

    python -m benchmarks.decode_floor benchmarks/results/<run>/bench.json [more bench.json ...]

A dense M = 1 `F.linear` (cuBLAS GEMV, bf16 and fp32, on every weight shape of the run) is a pure
weight stream, so its device times lie on one line: time = fixed + bytes / bandwidth.  The fixed
part is what every call pays in this harness whatever it reads (the launch seen through CUDA
events after the spin kernel, the first DRAM round trips after the L2 flush, the last wave's
tail); the slope is the bandwidth cuBLAS streams at.  A 4-bit kernel that streams its packed
weight as well as cuBLAS streams the dense one, with no more fixed cost, takes

    ideal = fixed + nf4kit bytes / bandwidth,

and no ratio against an anchor of the same run can beat anchor time / ideal without a lower fixed
cost or a faster stream than cuBLAS's (possible, not shown: gpu_sweep's `floor` section times an
empty launch and a bare read of the packed bytes directly).  This prints, per M = 1 shape: the
fitted line, that ideal, the measured nf4kit times, the best ratios the ideal allows against
bitsandbytes' gemv_4bit and bf16 cuBLAS, and the issue targets (2x bitsandbytes, 2.5x cuBLAS) as
times.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from benchmarks import anchors, roofline as rl

BF16_DENSE = anchors.dense_linear_label(torch.bfloat16)
DENSE_ANCHORS = (BF16_DENSE, anchors.dense_linear_label(torch.float32))
BNB_ANCHOR_PREFIX = "bnb "
TARGET_VS_BNB = 2.0     # issues 3 and 4: M = 1 on 4096x14336 >= 2x bitsandbytes gemv_4bit
TARGET_VS_CUBLAS = 2.5  # issue 3: >= 2.5x bf16 cuBLAS on the dense weight


def _decode_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("case") == "matmul_4bit" and r.get("M") == 1 and r.get("time_s")
            and not r.get("error")]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares time = fixed + bytes / bandwidth over (bytes, seconds) points.
    Returns (fixed seconds, bandwidth bytes/s, largest residual seconds)."""
    if len({b for b, _ in points}) < 2:
        raise ValueError("the fit needs dense anchors of at least two sizes")
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mt = sum(t for _, t in points) / n
    sxx = sum((b - mb) ** 2 for b, _ in points)
    slope = sum((b - mb) * (t - mt) for b, t in points) / sxx
    if slope <= 0:
        raise ValueError("the dense anchors' times do not grow with their bytes: no bandwidth to fit")
    fixed = mt - slope * mb
    worst = max(abs(t - (fixed + slope * b)) for b, t in points)
    return fixed, 1.0 / slope, worst


def decode_floor(rows: list[dict]) -> Optional[dict]:
    """The fit and, per M = 1 shape, the ideal and the ratios it allows; None without dense anchors
    of two sizes (a CPU run, a run without the torch anchors)."""
    dec = _decode_rows(rows)
    points = [(float(r["bytes"]), float(r["time_s"])) for r in dec if r.get("impl") in DENSE_ANCHORS]
    try:
        fixed, bw, worst = fit_line(points)
    except ValueError:
        return None
    shapes = []
    for key in sorted({(r["N"], r["K"]) for r in dec}):
        at = [r for r in dec if (r["N"], r["K"]) == key]
        ours = {r["backend"]: r for r in at if r.get("kind") == "nf4kit" and not r.get("fell_back")}
        if not ours:
            continue
        nbytes = float(next(iter(ours.values()))["bytes"])
        ideal = fixed + nbytes / bw
        bnb = next((r["time_s"] for r in at if str(r.get("impl", "")).startswith(BNB_ANCHOR_PREFIX)), None)
        cublas = next((r["time_s"] for r in at if r.get("impl") == BF16_DENSE), None)
        shapes.append({"N": key[0], "K": key[1], "bytes": nbytes, "ideal_s": ideal,
                       "ours_s": {b: r["time_s"] for b, r in sorted(ours.items())},
                       "bnb_s": bnb, "cublas_s": cublas})
    return {"fixed_s": fixed, "bandwidth": bw, "worst_residual_s": worst, "points": len(points), "shapes": shapes}


def markdown(fl: dict, title: str = "") -> list[str]:
    """The table of decode_floor's result."""
    t = rl.format_time
    md = [f"### M = 1 against what the harness allows{(' — ' + title) if title else ''}", "",
          f"Dense cuBLAS M = 1 ({fl['points']} points, bf16 and fp32): time = **{t(fl['fixed_s'])}** + bytes / "
          f"**{fl['bandwidth'] / 1e12:.2f} TB/s** (largest residual {t(fl['worst_residual_s'])}). *ideal*: that "
          "line at nf4kit's bytes, a kernel streaming the packed weight as cuBLAS streams the dense one.",
          "", "| N×K | nf4kit bytes | ideal | nf4kit (measured) | bnb gemv_4bit | 2× bnb needs | best vs bnb "
          "| bf16 cuBLAS | 2.5× cuBLAS needs | best vs cuBLAS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in fl["shapes"]:
        ours = ", ".join(f"{b} {t(v)}" for b, v in s["ours_s"].items())
        bnb, cub, ideal = s["bnb_s"], s["cublas_s"], s["ideal_s"]
        md.append(f"| {s['N']}×{s['K']} | {s['bytes'] / 1e6:.1f} MB | {t(ideal)} | {ours} | {t(bnb)} | "
                  f"{t(bnb and bnb / TARGET_VS_BNB)} | {'n/a' if bnb is None else f'{bnb / ideal:.2f}×'} | "
                  f"{t(cub)} | {t(cub and cub / TARGET_VS_CUBLAS)} | "
                  f"{'n/a' if cub is None else f'{cub / ideal:.2f}×'} |")
    return md + [""]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench_json", nargs="+")
    args = p.parse_args(argv)
    rc = 0
    for path in args.bench_json:
        with open(path) as f:
            d = json.load(f)
        fl = decode_floor(d.get("rows", []))
        if fl is None:
            print(f"{path}: no dense M = 1 anchors of two sizes to fit\n")
            rc = 1
            continue
        meta = d.get("meta", {})
        print("\n".join(markdown(fl, f"{meta.get('device_name', '?')}, commit {str(meta.get('git_commit', '?'))[:7]} "
                                     f"({path})")))
    return rc


if __name__ == "__main__":
    sys.exit(main())
