"""Smoke tests of the benchmark tooling: `benchmarks.run --quick` runs on tiny shapes and
produces its table and JSON; missing anchors print "n/a"; the roofline arithmetic; the GPU
report assembler on a synthetic stage directory.  No timing assertion: benchmarks measure,
tests don't (DESIGN.md §7)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

# the benchmarks package lives at the repository root (not installed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import anchors, decode_floor, gpu_report, roofline as rl  # noqa: E402
from benchmarks import run as bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_quick(tmp_path, *extra):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = bench.main(["--device", "cpu", "--quick", "--json", str(js), "--md", str(md), *extra])
    assert rc == 0
    return json.loads(js.read_text()), md.read_text()


def test_quick_run_produces_table_and_json(tmp_path):
    data, md = _run_quick(tmp_path)
    rows, meta = data["rows"], data["meta"]
    assert meta["device"] == "cpu" and meta["ceilings"]["copy_bw_Bps"] > 0 and meta["ceilings"]["matmul_rate_flops"] > 0
    assert meta["backends"], "no backend serves the CPU"
    kinds = {r["case"] for r in rows}
    assert kinds == set(bench.ALL_CASES)
    ours = [r for r in rows if r["kind"] == "nf4kit"]
    assert not [r for r in ours if r.get("error")], [r["error"] for r in ours if r.get("error")]
    for r in ours:
        assert r["time_s"] is not None and r["reps"] >= 1
        assert r["served_by"], r  # nf4kit.backends.last_backend was recorded
        assert r["backend"] in meta["backends"]
        assert r["floor_s"] > 0 and r["bound"] in ("memory", "compute")
        if "rel_err_vs_torch" in r:  # sanity column: each backend agrees with the oracle
            tol = 1e-2 if r["case"] != "dequantize_4bit" else 0.0
            assert r["rel_err_vs_torch"] <= tol, r
    # every nf4kit row of a case compares against the anchors that ran for that case
    anchors_ran = {(r["label"], r["impl"]) for r in rows if r["kind"] == "anchor" and r.get("time_s")}
    for r in ours:
        assert set(r["vs_anchor"]) == {a for (lbl, a) in anchors_ran if lbl == r["label"]}
    assert "| case | impl | ran on | time |" in md
    assert "Ceilings measured in this run" in md
    for b in meta["backends"]:
        assert f"nf4kit[{b}]" in md


def test_missing_bitsandbytes_prints_na(tmp_path, monkeypatch):
    monkeypatch.setattr(anchors, "_bnb", None)
    monkeypatch.setattr(anchors, "_bnb_error", "bitsandbytes not usable: simulated")
    data, md = _run_quick(tmp_path, "--cases", "dequantize_4bit,matmul_4bit", "--shapes", "64x128", "--m", "1")
    bnb_rows = [r for r in data["rows"] if r["kind"] == "anchor" and "bitsandbytes" in (r.get("note") or "")]
    assert bnb_rows and all(r["time_s"] is None for r in bnb_rows)
    assert "n/a" in md and "simulated" in md
    dense = [r for r in data["rows"] if r["kind"] == "anchor" and "F.linear" in r["impl"]]
    assert dense and all(r["time_s"] for r in dense)  # the other anchors still ran


def test_bitsandbytes_anchors_run_stock_bitsandbytes():
    """nf4kit registers itself as a bitsandbytes backend (the entry point, or enable()); the
    benchmark's bitsandbytes anchors must still time bitsandbytes' own kernels."""
    pytest.importorskip("bitsandbytes")
    import nf4kit
    from nf4kit.integrations import bitsandbytes as nf4kit_bnb

    x, W = torch.randn(1, 256), torch.randn(96, 256)
    packed, qs = nf4kit.quantize_4bit(W, blocksize=64, compress_statistics=True)
    nf4kit_bnb.enable()
    try:
        assert nf4kit_bnb.is_enabled()
        fn, name = anchors.bnb_matmul(x, packed, qs)
        assert fn is not None, name
        before = sum(nf4kit_bnb.call_counts.values())
        fn()
        assert sum(nf4kit_bnb.call_counts.values()) == before, "an anchor ran nf4kit's kernels"
        assert anchors.stock_bitsandbytes() and not nf4kit_bnb.is_enabled()
    finally:
        nf4kit_bnb.disable()


def test_plan_covers_the_targets():
    gpu = bench.plan("cuda", quick=False)
    labels = {c.label for c in gpu}
    assert "dequantize_4bit(dq) 4096x14336" in labels
    assert "matmul_4bit 4096x14336 M=1" in labels and "matmul_4bit 4096x14336 M=4096" in labels
    assert "matmul_4bit 4096x14336 M=16" in labels and "matmul_4bit 4096x14336 M=64" in labels
    assert bench.is_headline(next(c for c in gpu if c.label == "matmul_4bit 4096x14336 M=64"))
    assert "matmul_4bit_lora 4096x14336 M=4096" in labels and "backward_input 4096x14336 M=4096" in labels
    assert bench.is_headline(gpu[0])  # the targets run first under a time budget
    cpu = {c.label for c in bench.plan("cpu", quick=False)}
    for must in ("dequantize_4bit(dq) 4096x4096", "dequantize_4bit(dq) 4096x14336", "matmul_4bit 4096x4096 M=1",
                 "matmul_4bit 4096x14336 M=1", "matmul_4bit 4096x4096 M=256"):
        assert must in cpu


def test_host_overhead_table_on_the_cpu():
    """benchmarks.host_overhead: every column of the call chain is timed, with the backend that served it."""
    from benchmarks import host_overhead

    dev = torch.device("cpu")
    rows = host_overhead.measure(dev, torch.bfloat16, shapes=[(40, 64)], calls=64, rounds=1)
    (row,) = rows
    assert row["shape"] == "40x64" and row["backend"] in ("cpu", "torch")
    cols = ["layer", "public", "dispatch", "F.linear dense", "nn.Linear dense"]
    assert all(row[c] > 0 for c in cols)
    md = host_overhead.to_markdown(rows, dev)
    assert "| 40x64 |" in md and "layer / nn.Linear" in md


def test_roofline_arithmetic():
    n = 4096 * 4096
    w = rl.dequantize_4bit_work(n, torch.bfloat16, 64, nested=False)
    assert w.bytes == n // 2 + 4 * (n // 64) + 2 * n and w.flops == 0
    wn = rl.dequantize_4bit_work(n, torch.bfloat16, 64, nested=True)
    assert wn.bytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 256 + 4 + 2 * n
    m = rl.matmul_4bit_work(4096, 4096, 4096, torch.bfloat16)
    assert m.flops == 2 * 4096**3 and m.bound(rl.H100) == "compute"
    assert rl.matmul_4bit_work(1, 4096, 4096, torch.bfloat16).bound(rl.H100) == "memory"
    assert m.floor_s(rl.H100) == pytest.approx(2 * 4096**3 / 800e12)
    lo = rl.matmul_4bit_work(16, 4096, 4096, torch.bfloat16, r=16)
    assert lo.flops == 2 * 16 * 4096 * 4096 + 2 * 16 * 16 * (4096 + 4096)
    assert rl.format_time(None) == "n/a" and rl.format_time(2.5e-6) == "2.5 us"


def test_gpu_report_assembles_a_report(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "stages.tsv").write_text("env\t0\t3\t15\tH100\nbuild\t0\t42\t110\tbuilt\ntests\t1\t80\t120\t1 failed\n"
                                     "sanitizer\t124\t70\t70\t\n")
    (work / "card.txt").write_text("NVIDIA H100 80GB HBM3\n")
    (work / "commit.txt").write_text("abc123\n")
    (out / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1" '
        'time="1.5"><testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" '
        'name="test_b"><failure message="assert 1 == 2">trace</failure></testcase><testcase classname="tests.test_x" '
        'name="test_c"><skipped/></testcase></testsuite></testsuites>')
    (out / "sanitizer.log").write_text("  [cuda] dequantize ran on cuda\ngpu_sanitize: 0 problem(s)\n"
                                       "========= ERROR SUMMARY: 0 errors\n")
    assert gpu_report.main(["--work", str(work), "--out", str(out)]) == 0
    rep = (out / "gpu_report.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in rep and "abc123" in rep
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3" in rep
    assert "tests.test_x::test_b" in rep and "TIMEOUT" in rep
    assert "memcheck 0 error(s)" in rep
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("report:")  # the summary is printed last
    assert "CUT SHORT" not in rep  # the tests stage ended by itself (rc 1: a failure)
    # A tests stage stopped at its limit: its XML counts only the tests pytest reached, and says so.
    (work / "stages.tsv").write_text("tests\t124\t130\t120\t3 passed\n")
    assert gpu_report.main(["--work", str(work), "--out", str(out)]) == 0
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3 (2 s); CUT SHORT at the stage limit" in \
        (out / "gpu_report.md").read_text()
    # With the collected count (tests/conftest.py writes it for gpu_check.sh), the cut says how many.
    (work / "collected.txt").write_text("8\n")
    assert gpu_report.main(["--work", str(work), "--out", str(out)]) == 0
    assert "of 3 (2 s); 8 collected; CUT SHORT at the stage limit: 5 not reached" in \
        (out / "gpu_report.md").read_text()
    assert "against what the harness allows" not in (out / "gpu_report.md").read_text()  # no bench.json
    (out / "bench.json").write_text(json.dumps({"rows": _decode_rows(7e-6, 3e12)}))
    assert gpu_report.main(["--work", str(work), "--out", str(out)]) == 0
    assert "time = **7.0 us** + bytes / **3.00 TB/s**" in (out / "gpu_report.md").read_text()


def _decode_rows(fixed: float, bw: float, bnb: float = 33e-6) -> list[dict]:
    """M = 1 rows of bench.json: dense anchors on a line (fixed + bytes / bw), an nf4kit kernel of
    30 MB, one that fell back (not counted), bitsandbytes."""
    rows = []
    for N, K in ((4096, 4096), (4096, 14336)):
        for impl, size in (("torch F.linear bf16 dense", 2), ("torch F.linear fp32 dense", 4)):
            nbytes = size * N * K
            rows.append({"case": "matmul_4bit", "label": f"matmul_4bit {N}x{K} M=1", "M": 1, "N": N, "K": K,
                         "impl": impl, "kind": "anchor",
                         "bytes": nbytes, "time_s": fixed + nbytes / bw})
    ours = {"case": "matmul_4bit", "label": "matmul_4bit 4096x14336 M=1", "M": 1, "N": 4096, "K": 14336,
            "kind": "nf4kit", "bytes": 30e6, "time_s": 21e-6}
    rows += [dict(ours, impl="nf4kit[cuda]", backend="cuda", fell_back=False),
             dict(ours, impl="nf4kit[triton]", backend="triton", fell_back=True, time_s=99e-6),
             dict(ours, impl="bnb 0.50.2 gemv_4bit", kind="anchor", time_s=bnb)]
    return rows


def test_decode_floor_reads_the_dense_line():
    """The dense anchors' line gives the fixed cost and the bandwidth back; the ideal at nf4kit's bytes
    bounds the ratios against the anchors; a fallen-back row is not credited; no line, no table."""
    fl = decode_floor.decode_floor(_decode_rows(7e-6, 3e12))
    assert fl["fixed_s"] == pytest.approx(7e-6) and fl["bandwidth"] == pytest.approx(3e12)
    assert fl["worst_residual_s"] < 1e-12 and fl["points"] == 4
    (shape,) = [s for s in fl["shapes"] if (s["N"], s["K"]) == (4096, 14336)]
    assert shape["ideal_s"] == pytest.approx(17e-6) and shape["ours_s"] == {"cuda": 21e-6}
    assert shape["cublas_s"] == pytest.approx(7e-6 + 2 * 4096 * 14336 / 3e12)
    md = "\n".join(decode_floor.markdown(fl))
    assert "| 4096×14336 | 30.0 MB | 17.0 us | cuda 21.0 us | 33.0 us | 16.5 us | 1.94× |" in md
    one_size = [r for r in _decode_rows(7e-6, 3e12) if r["K"] == 14336 and "fp32" not in r["impl"]]
    assert decode_floor.decode_floor(one_size) is None
    assert decode_floor.decode_floor([]) is None


def test_conftest_writes_the_collected_count(tmp_path):
    """tests/conftest.py writes how many tests pytest collected to NF4KIT_COLLECTED_FILE, with and
    under xdist where it is installed (gpu_check.sh runs it; gpu_report's "not reached" rests on this)."""
    import importlib.util

    for extra in [[]] + ([["-n", "2"]] if importlib.util.find_spec("xdist") else []):
        path = tmp_path / f"collected{len(extra)}.txt"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra,
                            os.path.join(ROOT, "tests", "test_format.py"), "-k", "not nothing_matches_this"],
                           capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, NF4KIT_COLLECTED_FILE=str(path)))
        assert r.returncode == 0, r.stdout[-2000:]
        passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
        assert path.read_text().strip() == str(passed)


def test_gpu_check_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_settings_are_restored_even_when_the_step_raises():
    """benchmarks._settings.settings: the sweeps and the sanitizer run each variant under it; a
    variant that raises must not leave its routing in place for the next one, and a misspelt
    setting must fail instead of silently changing nothing."""
    import types

    from benchmarks._settings import settings

    mod = types.SimpleNamespace(GEMV_MMA=False, GEMV_STREAM=True)
    with settings(mod, GEMV_MMA=True, GEMV_STREAM=False):
        assert mod.GEMV_MMA is True and mod.GEMV_STREAM is False
    assert mod.GEMV_MMA is False and mod.GEMV_STREAM is True
    with pytest.raises(RuntimeError):
        with settings(mod, GEMV_MMA=True):
            raise RuntimeError("a variant failed")
    assert mod.GEMV_MMA is False
    with pytest.raises(AttributeError):
        with settings(mod, GEMV_MAA=True):
            pass
    assert not hasattr(mod, "GEMV_MAA")


def test_gpu_scripts_name_only_settings_that_exist():
    """Every routing setting the GPU sweep, sanitizer and profile targets set (settings(cb, NAME=...),
    dict(NAME=...) variants, gpu_profile_target.VARIANTS) is an attribute of the cuda backend or the
    Triton matmul module.  On the GPU a misspelt one raises, but only after minutes of scarce device
    time; here it fails in CI."""
    import ast

    from nf4kit.backends import cuda as cuda_backend
    from nf4kit.triton_kernels import matmul as triton_matmul

    from benchmarks import gpu_profile_target

    modules = {"cb": cuda_backend, "tm": triton_matmul}
    checked = 0
    for script in ("gpu_sweep.py", "gpu_sanitize.py"):
        tree = ast.parse(open(os.path.join(ROOT, "benchmarks", script)).read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            names = [k.arg for k in node.keywords if k.arg is not None]
            if node.func.id == "settings" and isinstance(node.args[0], ast.Name):
                module = modules[node.args[0].id]
                missing = [n for n in names if not hasattr(module, n)]
            elif node.func.id == "dict" and names and all(n.isupper() for n in names):
                missing = [n for n in names if not any(hasattr(m, n) for m in modules.values())]
            else:
                continue
            assert not missing, f"benchmarks/{script}:{node.lineno}: no such setting {missing}"
            checked += len(names)
    for call, values in gpu_profile_target.VARIANTS.items():
        assert all(hasattr(cuda_backend, n) for n in values), (call, values)
    assert set(gpu_profile_target.SHAPES) <= set(gpu_profile_target.VARIANTS)
    assert checked > 30  # the walk found the sweep's settings


def test_sweep_points_are_read_against_their_groups_default():
    """gpu_report reads a sweep log per backend, M and shape: fastest first, each point's difference
    to the group's point labelled default (else its first point); unparsable lines are skipped."""
    log = "\n".join([
        "cuda M=1 4096x14336 default (tensor-core stream, depth 2):     24.0 us  host  118.2 us  rel_err 2.7e-03",
        "cuda M=1 4096x14336 mma depth=2 pdl finalize:     22.5 us  host  120.0 us  rel_err 2.7e-03",
        "cuda M=1 4096x14336 mma wide finalize: RuntimeError: cuda.gemv_4bit failed",
        "cuda M=16 4096x14336 fused GEMM:     58.1 us  host  138.5 us  rel_err 1.7e-03",
        "cuda M=16 4096x14336 mma batch depth=2 (tensor cores):     32.4 us  host  150.1 us  rel_err 2.7e-03",
        "triton M=1 4096x14336 word path (autotuned):     26.3 us  host  110.0 us  rel_err 2.3e-03",
        "triton M=1 4096x14336 stream {'BLOCK_N': 1} (default):     23.2 us  host  100.0 us  rel_err 2.3e-03",
        "floor: read 4096x14336 (29.4 MB) BLOCK=1024 ITERS=4 warps=4:     13.1 us    2241 GB/s",
        "floor: read 4096x14336 (29.4 MB) BLOCK=2048 ITERS=4 warps=8:     12.2 us    2406 GB/s"])
    lines = gpu_report.sweep_fastest(log, per_group=5)
    assert [ln.split("us")[0].strip() for ln in lines] == ["22.5", "24.0", "32.4", "58.1", "23.2", "26.3", "12.2",
                                                            "13.1"]
    assert "-1.5 us" in lines[0] and "(baseline)" in lines[1]
    assert "-25.7 us" in lines[2] and "(baseline)" in lines[3]   # no default: the first point
    assert "(baseline)" in lines[4] and "+3.1 us" in lines[5]    # the default is not the first point
    # Floors are not variants of one call: no baseline, no difference.
    assert re.match(r"\s*12\.2 us\s+floor: read", lines[6]) and re.match(r"\s*13\.1 us\s+floor: read", lines[7])


def test_read_floor_kernel_xors_each_programs_words():
    """benchmarks/_read_floor.read_words (the sweep's pure-read floor) reads every word once: each
    program's output is the XOR of its block * iters words, the tail masked.  On the CPU under the
    Triton interpreter (tests/conftest.py sets it where there is no GPU), else on the GPU."""
    import functools
    import operator

    pytest.importorskip("triton")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting and not torch.cuda.is_available():
        pytest.skip("neither the Triton interpreter nor a GPU")
    from benchmarks._read_floor import read_words

    g = torch.Generator().manual_seed(5)
    words = torch.randint(-2**31, 2**31 - 1, (3 * 512 + 77,), dtype=torch.int32, generator=g)
    out = read_words(words.to("cpu" if interpreting else "cuda"), 128, 4, 4)
    exp = [functools.reduce(operator.xor, words[i:i + 512].tolist()) for i in range(0, words.numel(), 512)]
    assert out.tolist() == exp
