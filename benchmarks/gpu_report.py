"""Assemble the report of benchmarks/gpu_check.sh from what its stages left behind.

    python -m benchmarks.gpu_report --work /tmp/gpu_check --out $OUT

Reads the stage table (stages.tsv: name, exit status, seconds, limit), nvidia-smi's card
name, the commit, build_info.json, pytest's junit XML, the compute-sanitizer log and the
benchmark table; writes gpu_report.md and prints a short summary table LAST (the device tool
returns only the tail of the output).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Optional

from benchmarks import decode_floor


def read(path: str, default: str = "") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def stages(work: str) -> list[dict]:
    out = []
    for line in read(os.path.join(work, "stages.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            out.append(dict(name=parts[0], rc=int(parts[1]), seconds=int(parts[2]), limit=int(parts[3]),
                            note=parts[4] if len(parts) > 4 else ""))
    return out


def junit_summary(path: str) -> dict:
    """tests / failures / errors / skipped / passed, and the failing test ids."""
    res = dict(tests=0, failures=0, errors=0, skipped=0, passed=0, failed_ids=[], time=0.0, found=False)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return res
    res["found"] = True
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            res[k] += int(s.get(k, 0))
        res["time"] += float(s.get("time", 0) or 0)
        for case in s.iter("testcase"):
            for child in case:
                if child.tag in ("failure", "error"):
                    msg = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
                    res["failed_ids"].append(f"{case.get('classname')}::{case.get('name')} [{child.tag}] {msg}")
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    return res


_SWEEP_POINT = re.compile(r"^(?P<label>.+?):\s+(?P<us>[0-9.]+) us\b")


def _sweep_groups(log: str) -> dict[str, list[tuple[float, str]]]:
    """benchmarks.gpu_sweep's timed points, per backend and weight shape (the label's first words up
    to the shape, e.g. 'cuda M=1 4096x14336'), in the order they ran."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for ln in log.splitlines():
        m = _SWEEP_POINT.match(ln.strip())
        if not m:
            continue
        label = m.group("label")
        shape = re.search(r"\d+x\d+", label)
        key = label[:shape.end()] if shape else label.split(" ")[0]
        groups.setdefault(key, []).append((float(m.group("us")), label))
    return groups


def sweep_fastest(log: str, per_group: int = 5) -> list[str]:
    """The fastest points of each group, fastest first, each with its difference to the group's
    baseline: the point labelled 'default' where the group has one, else the group's first point
    (the kernel the tensor-core ones replaced, at M > 1).  A negative difference is a gain."""
    out = []
    for key, pts in _sweep_groups(log).items():
        base_us, base = next(((us, lb) for us, lb in pts if "default" in lb), pts[0])
        for us, label in sorted(pts)[:per_group]:
            if key.startswith(("read floor", "floor")):  # floors, not variants of one call
                mark = ""
            else:
                mark = "(baseline)" if label == base else f"{us - base_us:+6.1f} us"
            out.append(f"{us:8.1f} us  {mark:>10}  {label}")
    return out


def sanitizer_summary(log: str) -> str:
    """One verdict per sanitized run ('## gpu_sanitize --backends B' headers; a log without them is
    one run): memcheck's error count, or that it did not finish, and gpu_sanitize's own problems."""
    runs = re.split(r"^## gpu_sanitize --backends (\S+)\s*$", log, flags=re.M)
    named = list(zip(runs[1::2], runs[2::2])) if len(runs) > 1 else [("", log)]
    out = []
    for name, text in named:
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        probs = re.search(r"gpu_sanitize: (\d+) problem", text)
        part = f"memcheck {m.group(1)} error(s)" if m else "memcheck: no ERROR SUMMARY line (did not finish?)"
        if probs:
            part += f", {probs.group(1)} call problem(s)"
        out.append(f"{name}: {part}" if name else part)
    return "; ".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    W, O = args.work, args.out
    st = stages(W)
    card = read(os.path.join(W, "card.txt")).strip() or "unknown card"
    commit = read(os.path.join(W, "commit.txt")).strip() or "unknown"
    started = read(os.path.join(W, "started.txt")).strip()
    build_info = read(os.path.join(W, "build_info.json")).strip()
    ju = junit_summary(os.path.join(O, "junit.xml"))
    san_log = read(os.path.join(O, "sanitizer.log"))
    bench_md = read(os.path.join(O, "bench.md")).strip()
    bench_json = {}
    try:
        bench_json = json.loads(read(os.path.join(O, "bench.json")) or "{}")
    except json.JSONDecodeError:
        pass
    total = sum(s["seconds"] for s in st)
    date = started or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    tests_line = (f"{ju['passed']} passed, {ju['failures']} failed, {ju['errors']} errors, {ju['skipped']} skipped "
                  f"of {ju['tests']} ({ju['time']:.0f} s)" if ju["found"] else "no junit XML (pytest did not finish)")
    collected = read(os.path.join(W, "collected.txt")).strip()
    if ju["found"] and collected.isdigit():
        tests_line += f"; {collected} collected"
    if ju["found"] and any(s["name"] == "tests" and s["rc"] in (124, 137) for s in st):
        # pytest cut at the stage limit still writes its XML, counting only the tests it reached
        tests_line += "; CUT SHORT at the stage limit: " + (
            f"{int(collected) - ju['tests']} not reached" if collected.isdigit()
            else "the tests not reached are missing from this count")
    md = [f"# nf4kit GPU check — {card}", "",
          f"- date: {date}", f"- commit: {commit}", f"- total stage time: {total} s"]
    if os.environ.get("GPU_CHECK_BENCH_ENV"):
        md.append(f"- benchmark settings: `{os.environ['GPU_CHECK_BENCH_ENV']}` (bench stage only)")
    md.append("")
    md += ["## Stages", "", "| stage | status | seconds | limit | note |", "|---|---|---|---|---|"]
    for s in st:
        status = "ok" if s["rc"] == 0 else ("TIMEOUT" if s["rc"] in (124, 137) else f"FAILED rc={s['rc']}")
        md.append(f"| {s['name']} | {status} | {s['seconds']} | {s['limit']} | {s['note']} |")
    md += ["", "## Build", "", "```", build_info or "(no build_info)", "```", "",
           "## Tests (pytest on CUDA)", "", tests_line, ""]
    if ju["failed_ids"]:
        md += ["Failing:", ""] + [f"- `{f}`" for f in ju["failed_ids"][:80]]
        if len(ju["failed_ids"]) > 80:
            md.append(f"- … {len(ju['failed_ids']) - 80} more (junit.xml)")
        md.append("")
    md += ["## compute-sanitizer memcheck", "", sanitizer_summary(san_log), "", "```"]
    md += [ln for ln in san_log.splitlines() if ln.strip().startswith("[") or "gpu_sanitize" in ln
           or "ERROR SUMMARY" in ln or "Invalid" in ln][:120]
    md += ["```", "", "## Benchmarks", "", bench_md or "(no benchmark table)", ""]
    floor = decode_floor.decode_floor(bench_json.get("rows", []))
    if floor is not None:
        md += decode_floor.markdown(floor)
    sweep_log = read(os.path.join(O, "sweep.log"))
    if sweep_log:
        md += ["## Decode sweep (benchmarks.gpu_sweep; fastest first per group, against the group's default "
               "or first point)", "", "```"]
        md += sweep_fastest(sweep_log, per_group=10) + ["```", "", "Every point:", "", "```",
                                                        sweep_log.strip(), "```", ""]
    with open(os.path.join(O, "gpu_report.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    # ---- short summary, printed last
    print("\n" + "=" * 100)
    print(f"GPU CHECK SUMMARY  {card}  commit {commit[:12]}  {date}")
    if os.environ.get("GPU_CHECK_BENCH_ENV"):
        print(f"bench settings: {os.environ['GPU_CHECK_BENCH_ENV']}")
    print(f"{'stage':<14}{'status':<16}{'s':>6}{'limit':>7}  note")
    for s in st:
        status = "ok" if s["rc"] == 0 else ("TIMEOUT" if s["rc"] in (124, 137) else f"FAILED rc={s['rc']}")
        print(f"{s['name']:<14}{status:<16}{s['seconds']:>6}{s['limit']:>7}  {s['note'][:60]}")
    print(f"tests:      {tests_line}")
    # the device tool returns the last 12 000 characters: keep this block well under that
    for fid in ju["failed_ids"][:20]:
        print(f"  FAIL {fid[:120]}")
    if len(ju["failed_ids"]) > 20:
        print(f"  ... {len(ju['failed_ids']) - 20} more failing (see junit.xml / gpu_report.md)")
    print(f"sanitizer:  {sanitizer_summary(san_log)}")
    rows = bench_json.get("rows") or []
    if rows:
        from .run import summary_lines

        meta = bench_json.get("meta", {})
        c = meta.get("ceilings", {})
        print(f"bench:      {len(rows)} rows; ceilings copy {c.get('copy_bw_Bps', 0) / 1e9:.0f} GB/s, "
              f"matmul {c.get('matmul_rate_flops', 0) / 1e12:.0f} TFLOP/s; bnb {meta.get('bitsandbytes') or 'n/a'}")
        lines = summary_lines(rows)
        for ln in lines[:40]:
            print("  " + ln[:150])
        if len(lines) > 40:
            print(f"  ... {len(lines) - 40} more rows in bench.md / gpu_report.md")
    else:
        print("bench:      no results")
    if sweep_log:
        print("sweep (fastest per group):")
        for ln in sweep_fastest(sweep_log, per_group=4):
            print("  " + ln[:150])
    print(f"report:     {os.path.join(O, 'gpu_report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
