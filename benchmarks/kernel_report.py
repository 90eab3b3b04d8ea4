"""Static kernel report: the GPU machine code of every nf4kit kernel, without a GPU (issue 6).

    python -m benchmarks.kernel_report [--so PATH] [--archs 80,90] [--registry MODULE]
                                       [--first-config-only] [--out benchmarks/results/kernel_report.md]
                                       [--json out.json] [--check]

Triton: every kernel of the registry (default `nf4kit.triton_kernels.registry`) is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` for sm_80 and sm_90,
once per autotune config.  CUDA: the cubins of csrc/cuda are read out of the built extension
(python/nf4kit/_C*.so, or --so; the fatbin is inside the .so).  Both are disassembled with the
cuobjdump that Triton's wheel carries (triton/backends/nvidia/bin), or the CUDA toolkit's.

Per kernel, target and config: registers, spill / local-memory bytes (and LDL/STL count),
static + dynamic shared memory, HMMA / HGMMA count, 128-bit global loads / stores
(LDG.E.128, STG.E.128, LDGSTS.128 = cp.async 16 B, UTMALDG = TMA), the occupancy that follows
from registers / shared memory / threads under the sm_80 / sm_90 limits, the FMA count of the
PTX (for the bit-exact kernels), and the H100 roofline floor of the kernel's role at the
headline shape.  `check_invariants` turns the design rules into violations (tests/ use it).

Registry format (triton_kernels/registry.py): a list `KERNELS` (or a function `kernels()`
returning one) of dicts or objects with
    name          str, unique
    fn            the launched kernel: @triton.jit function, or wrapped by @triton.autotune /
                  @triton.heuristics (configs are then read from the autotuner)
    signature     {arg: triton type} for the runtime args, e.g. {"x_ptr": "*bf16", "n": "i32"}
                  (constexpr args may be left out: they are added from constexprs/configs)
    constexprs    {arg: value} for the constexpr args not set by a config (include the values
                  @triton.heuristics would compute)
    configs       optional [ {"num_warps": 4, "num_stages": 3, "BLOCK_M": 64, ...}, ... ]
                  (default: the autotuner's configs, else one default config)
    role          "dequantize" | "quantize" | "gemv" | "gemm" | "gemm_bwd" | "other"
    bit_exact     True: compiled with enable_fp_fusion=False, its PTX must hold no fma.rn.f32
    divisible_by_16  optional: int args the JIT would see as multiples of 16 (pointers always are)
    options       optional extra compile options ({"maxnreg": 128}, ...)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterable, Optional

from . import roofline as rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REGISTRY = "nf4kit.triton_kernels.registry"
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "kernel_report.md")
CACHE_DIR = os.path.join(ROOT, ".nf4kit_cache", "kernel_report")
ROLES = ("dequantize", "quantize", "gemv", "gemm", "gemm_bwd", "other")
OPTION_KEYS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
               "debug", "extern_libs"}

# Per-SM limits (CUDA occupancy calculator values).
ARCH_LIMITS = {
    80: dict(regs=65536, max_warps=64, max_blocks=32, smem=167936, smem_block=166912, smem_reserved=1024),
    90: dict(regs=65536, max_warps=64, max_blocks=32, smem=233472, smem_block=232448, smem_reserved=1024),
}


# ---------------------------------------------------------------- tools
def find_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm: Triton's wheel first (always there in CI), then PATH, then CUDA."""
    try:
        import triton  # noqa: F401  (import only to locate the wheel)

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except Exception:
        pass
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _run(cmd: list[str], timeout: float = 120) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return r.stdout


# ---------------------------------------------------------------- parsing
_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_sass(text: str) -> dict[str, collections.Counter]:
    """`cuobjdump -sass` output -> {function: Counter(full opcode with modifiers)}."""
    out: dict[str, collections.Counter] = {}
    cur: Optional[collections.Counter] = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            cur = out.setdefault(m.group(1), collections.Counter())
            continue
        if cur is None:
            continue
        m = _SASS_RE.search(line)
        if m:
            cur[m.group(1)] += 1
    return out


_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);")
_BRA_RE = re.compile(r"^BRA(?:\.[A-Z.]+)?$")


def sass_instructions(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """`cuobjdump -sass` output -> {function: [(address, full opcode, operands)]} in address order."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    cur: Optional[list] = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSTR_RE.search(line) if cur is not None else None
        if m:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return out


def main_loop_ops(instrs: list[tuple[int, str, str]]) -> collections.Counter:
    """Opcode counts (base opcode, modifiers dropped) of a function's main loop: the address range
    from the target of its longest backward branch to that branch, among the loops that hold an HMMA
    when any does (a tensor-core kernel's epilogue loops, bias and LoRA unrolled, can be wider than
    its main loop) and hold no EXIT (the out-of-line BRA.DIV stubs after the last EXIT branch back
    into the code above).  Static counts: both sides of a branch inside the loop are counted once
    each.  Empty if the function has no loop."""
    hmma = [addr for addr, op, _ in instrs if op.startswith("HMMA")]
    exits = [addr for addr, op, _ in instrs if op == "EXIT"]
    best: Optional[tuple[int, int]] = None
    for addr, op, operands in instrs:
        if _BRA_RE.match(op):
            t = re.search(r"0x([0-9a-f]+)", operands)
            target = int(t.group(1), 16) if t else None
            if target is None or target >= addr or any(target <= e <= addr for e in exits) or \
                    (hmma and not any(target <= h <= addr for h in hmma)):
                continue
            if best is None or addr - target > best[1] - best[0]:
                best = (target, addr)
    ops: collections.Counter = collections.Counter()
    if best is not None:
        for addr, op, _ in instrs:
            if best[0] <= addr <= best[1]:
                ops[op.split(".")[0]] += 1
    return ops


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump -res-usage` output -> {function: {regs, stack, static_smem, local}}."""
    out: dict[str, dict[str, int]] = {}
    func = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            func = m.group(1)
            continue
        m = _RES_RE.search(line)
        if m and func:
            out[func] = dict(regs=int(m.group(1)), stack=int(m.group(2)), static_smem=int(m.group(3)),
                             local=int(m.group(4)))
            func = None
    return out


def sass_features(ops: collections.Counter) -> dict[str, int]:
    """Counts of the instruction classes the invariants look at."""
    def n(pred) -> int:
        return sum(c for op, c in ops.items() if pred(op))

    def base(op: str) -> str:
        return op.split(".")[0]

    return dict(
        n_instr=sum(ops.values()),
        hmma=n(lambda o: base(o) == "HMMA"),
        hgmma=n(lambda o: base(o) in ("HGMMA", "QGMMA", "IGMMA")),
        ldg=n(lambda o: base(o) == "LDG"),
        ldg128=n(lambda o: base(o) == "LDG" and ".128" in o),
        ldg_stream=n(lambda o: base(o) == "LDG" and "EF" in o.split(".")),
        ldgsts128=n(lambda o: base(o) == "LDGSTS" and ".128" in o),
        tma_load=n(lambda o: base(o) in ("UTMALDG", "UBLKCP")),
        stg=n(lambda o: base(o) == "STG"),
        stg128=n(lambda o: base(o) == "STG" and ".128" in o),
        tma_store=n(lambda o: base(o) == "UTMASTG"),
        ldl=n(lambda o: base(o) == "LDL"),
        stl=n(lambda o: base(o) == "STL"),
        ffma=n(lambda o: base(o) == "FFMA"),
    )


_PTX_FMA_RE = re.compile(r"^\s*(?:@%p\d+\s+)?fma\.rn(?:\.ftz)?\.f32\b", re.M)


def ptx_fma_count(ptx: str) -> int:
    """fp32 fused multiply-adds in PTX (fma.rn.f32): none may appear in a bit-exact decode."""
    return len(_PTX_FMA_RE.findall(ptx))


def split_ptx_entries(ptx: str) -> dict[str, str]:
    """PTX module -> {entry name: its body}."""
    out: dict[str, str] = {}
    parts = re.split(r"(?m)^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+", ptx)
    for part in parts[1:]:
        m = re.match(r"([\w$]+)", part)
        if m:
            out[m.group(1)] = part
    return out


def occupancy(arch: int, regs: int, smem_bytes: int, threads: int) -> dict[str, Any]:
    """Resident blocks per SM and the fraction of warp slots they fill, from registers (in
    per-warp units of 256), shared memory (+1 KB reserved per block) and threads."""
    lim = ARCH_LIMITS.get(arch, ARCH_LIMITS[90])
    warps = max(1, -(-threads // 32))
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // warps
    smem = smem_bytes + lim["smem_reserved"]
    if smem_bytes > lim["smem_block"]:
        by_smem = 0
    else:
        by_smem = lim["smem"] // (-(-smem // 128) * 128)
    by_threads = lim["max_warps"] // warps
    blocks = max(0, min(by_regs, by_smem, by_threads, lim["max_blocks"]))
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("threads", by_threads),
                   ("blocks", lim["max_blocks"])), key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, occupancy=blocks * warps / lim["max_warps"],
                limiter=limiter)


def headline_floor(role: str) -> tuple[Optional[float], str]:
    """H100 roofline floor of a kernel's role at the headline shape (weight 4096×14336, bf16)."""
    N, K = 4096, 14336
    bf = __import__("torch").bfloat16
    if role == "dequantize":
        return rl.dequantize_4bit_work(N * K, bf, 64, True).floor_s(rl.H100), "deq 4096×14336 dq→bf16"
    if role == "quantize":
        return rl.quantize_4bit_work(N * K, bf, 64, False).floor_s(rl.H100), "quant 4096×14336 bf16"
    if role == "gemv":
        return rl.matmul_4bit_work(1, N, K, bf).floor_s(rl.H100), "M=1 4096×14336"
    if role == "gemm":
        return rl.matmul_4bit_work(4096, N, K, bf, r=16).floor_s(rl.H100), "M=4096 4096×14336 r16"
    if role == "gemm_bwd":
        return rl.backward_input_work(4096, N, K, bf, r=16).floor_s(rl.H100), "dX M=4096 4096×14336 r16"
    return None, ""


def infer_role(name: str) -> str:
    """Role from a kernel's name (when the registry does not give one)."""
    n = name.lower()
    if "reduce" in n or "finalize" in n or "epilogue" in n:
        return "other"
    if "dequant" in n:
        return "dequantize"
    if "backward" in n or "bwd" in n or "grad" in n:
        return "gemm_bwd"
    if "gemv" in n or "splitk" in n or "split_k" in n or "decode" in n:
        return "gemv"
    if "gemm" in n or "matmul" in n or "mma" in n or "fused" in n:
        return "gemm"
    if "quant" in n:
        return "quantize"
    return "other"


# ---------------------------------------------------------------- one record per kernel × arch × config
@dataclasses.dataclass
class KernelStat:
    source: str                 # "triton" | "cuda" | "demo"
    name: str
    arch: int
    config: str = ""
    role: str = "other"
    bit_exact: bool = False
    fp_fusion: Optional[bool] = None
    threads: Optional[int] = None
    threads_assumed: bool = False
    regs: Optional[int] = None
    stack: Optional[int] = None
    local: Optional[int] = None
    static_smem: Optional[int] = None
    dynamic_smem: Optional[int] = None
    n_instr: int = 0
    hmma: int = 0
    hgmma: int = 0
    ldg: int = 0
    ldg128: int = 0
    ldg_stream: int = 0  # evict-first (read-once) loads, any width
    ldgsts128: int = 0
    tma_load: int = 0
    stg: int = 0
    stg128: int = 0
    tma_store: int = 0
    ldl: int = 0
    stl: int = 0
    ffma: int = 0
    ptx_fma: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    occupancy: Optional[float] = None
    occ_limiter: str = ""
    floor_s: Optional[float] = None
    floor_case: str = ""
    expect_violation: Optional[str] = None
    error: Optional[str] = None
    # M = 1 decode kernels (M1_LOOP_KERNELS): static SASS of the main loop, and the weights one lane
    # multiplies per iteration (8 per HMMA m16n8k16, 256 weights / 32 lanes; without HMMA one per FFMA)
    loop_instr: Optional[int] = None
    loop_weights: Optional[int] = None

    @property
    def loop_per_weight(self) -> Optional[float]:
        return self.loop_instr / self.loop_weights if self.loop_instr and self.loop_weights else None

    @property
    def smem(self) -> int:
        return (self.static_smem or 0) + (self.dynamic_smem or 0)

    @property
    def spills(self) -> bool:
        return bool((self.local or 0) > 0 or self.ldl or self.stl)


def fill_from_cubin(st: KernelStat, sass_ops: collections.Counter, res: Optional[dict]) -> None:
    for k, v in sass_features(sass_ops).items():
        setattr(st, k, v)
    if res:
        st.regs, st.stack, st.local, st.static_smem = res["regs"], res["stack"], res["local"], res["static_smem"]
    if st.regs is not None and st.threads:
        occ = occupancy(st.arch, st.regs, st.smem, st.threads)
        st.blocks_per_sm, st.occupancy, st.occ_limiter = occ["blocks_per_sm"], occ["occupancy"], occ["limiter"]
    st.floor_s, st.floor_case = headline_floor(st.role)


def analyse_cubin(path: str, cuobjdump: str) -> tuple[dict[str, collections.Counter], dict[str, dict],
                                                      dict[str, collections.Counter]]:
    """(opcode counts, resource usage, main-loop opcode counts) per function of a cubin."""
    text = _run([cuobjdump, "-sass", path])
    loops = {fn: main_loop_ops(ins) for fn, ins in sass_instructions(text).items()}
    return parse_sass(text), parse_res_usage(_run([cuobjdump, "-res-usage", path])), loops


# The decode kernels whose main loop is summarised (instructions per weight and lane): the M = 1
# stream kernels and the tensor-core batch kernel (M <= 16: its HMMA carry 8 batch rows at once).
M1_LOOP_KERNELS = ("gemv_4bit_stream_kernel", "gemv_4bit_mma_kernel", "gemv_stream_m1", "gemv_4bit_mma_batch_kernel",
                   "gemm_4bit_table_kernel")


def _last_template_int(kernel: str, name: str) -> int:
    """The last template argument of `kernel`<...> in a demangled name; 1 for any other kernel."""
    m = re.search(kernel + r"<[^<>]*,\s*(\d+)>", name)
    return int(m.group(1)) if m else 1


def mma_n_tiles(name: str) -> int:
    """The n-tiles (8 batch rows each) of a tensor-core batch GEMV (its last template argument) or a
    table GEMM (its second: <TX, NT, compact>); 1 otherwise."""
    m = re.search(r"gemm_4bit_table_kernel<[^<>,]*,\s*(\d+)", name)
    return int(m.group(1)) if m else _last_template_int("gemv_4bit_mma_batch_kernel", name)


def mma_compact(name: str) -> bool:
    """Whether an M = 1 tensor-core GEMV is the compact form (<TX, D, BR, CX>: CX, the last)."""
    return bool(re.search(r"gemv_4bit_mma_kernel<.*,\s*true>", name))


def fill_loop(st: KernelStat, loop: Optional[collections.Counter]) -> None:
    """Main-loop size of a decode kernel (M1_LOOP_KERNELS), and its weights per lane: 8 per A fragment
    (HMMA / n-tiles: the batch kernel's n-tiles share one), or without tensor cores one per FFMA (a
    slight overcount: the scale's few FFMA are counted too)."""
    if loop and any(k in st.name for k in M1_LOOP_KERNELS):
        st.loop_instr = sum(loop.values())
        st.loop_weights = 8 * loop["HMMA"] // mma_n_tiles(st.name) if loop["HMMA"] else loop["FFMA"]


# ---------------------------------------------------------------- Triton
def _get(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, dict):
        return spec.get(key, default)
    return getattr(spec, key, default)


def load_registry(module: str, arch: Optional[int] = None) -> list[Any]:
    """The registry's entries (for `arch` when the registry lists configs per arch)."""
    mod = importlib.import_module(module)
    for fname in ("kernel_specs", "kernels"):
        fn = getattr(mod, fname, None)
        if callable(fn):
            if arch is not None:
                try:
                    return list(fn(arch=arch))
                except TypeError:
                    pass
            return list(fn())
    if hasattr(mod, "KERNELS"):
        return list(mod.KERNELS)
    if hasattr(mod, "REGISTRY"):
        reg = mod.REGISTRY
        return list(reg.values()) if isinstance(reg, dict) else list(reg)
    raise AttributeError(f"{module} has no KERNELS list or kernel_specs()/kernels() function")


def _unwrap_jit(fn: Any) -> tuple[Any, list[dict]]:
    """(JITFunction, autotune configs as dicts) of a possibly autotuned / heuristics-wrapped kernel."""
    from triton.runtime.jit import JITFunction

    configs: list[dict] = []
    seen = 0
    while not isinstance(fn, JITFunction):
        if hasattr(fn, "configs") and not configs:
            for c in fn.configs:
                d = dict(c.all_kwargs()) if hasattr(c, "all_kwargs") else dict(
                    c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                configs.append({k: v for k, v in d.items() if v is not None})
        if not hasattr(fn, "fn"):
            raise TypeError(f"{type(fn).__name__} is not a Triton kernel (no JITFunction inside)")
        fn = fn.fn
        seen += 1
        if seen > 8:
            raise TypeError("kernel wrapper chain too deep")
    return fn, configs


def _is_tile_param(k: str, v: Any) -> bool:
    """Tile-shape constexprs worth showing in the config column."""
    return (isinstance(v, int) and not isinstance(v, bool)
            and bool(re.match(r"^(BLOCK|BM$|BN$|BK$|SPLIT|GROUP|TILE)", k)))


def _config_label(cfg: dict) -> str:
    keys = sorted(cfg, key=lambda k: (k not in OPTION_KEYS, k))
    short = {"num_warps": "w", "num_stages": "s", "num_ctas": "ctas", "maxnreg": "maxnreg"}
    return " ".join(f"{short.get(k, k)}={cfg[k]}" for k in keys if k != "enable_fp_fusion")


def compile_triton_spec(spec: Any, arch: int, cfg: dict, cuobjdump: str, workdir: str) -> KernelStat:
    """Compile one registry entry for one arch and config (no GPU needed) and analyse it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = _get(spec, "name")
    role = _get(spec, "role") or infer_role(name)
    bit_exact = bool(_get(spec, "bit_exact", False) or _get(spec, "exact", False))
    st = KernelStat(source=_get(spec, "source", "triton"), name=name, arch=arch, config=_config_label(cfg),
                    role=role, bit_exact=bit_exact, expect_violation=_get(spec, "expect_violation"))
    try:
        jit, _ = _unwrap_jit(_get(spec, "fn"))
        # a constexpr with a default in the kernel's signature (e.g. PREFETCH=1) compiles at that default
        consts = {prm.name: prm.default for prm in getattr(jit, "params", ())
                  if prm.is_constexpr and prm.has_default}
        consts.update(_get(spec, "constexprs") or {})
        options = {"enable_fp_fusion": not bit_exact}
        for k, v in cfg.items():
            (options if k in OPTION_KEYS else consts).__setitem__(k, v)
        options.update(_get(spec, "options") or {})
        st.config = _config_label({**{k: v for k, v in consts.items() if _is_tile_param(k, v)}, **options})
        given = dict(_get(spec, "signature") or {})
        sig: dict[str, str] = {}
        for a in jit.arg_names:
            if a in consts:
                sig[a] = "constexpr"
            elif a in given:
                sig[a] = given[a]
            else:
                raise ValueError(f"argument {a!r} has no type in the signature and no constexpr value")
        div = set(_get(spec, "divisible_by_16") or _get(spec, "divisible") or ())
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(jit.arg_names)
                 if sig[a] != "constexpr" and (sig[a].startswith("*") or a in div)}
        src = ASTSource(fn=jit, signature=sig, constexprs={k: v for k, v in consts.items() if k in jit.arg_names},
                        attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        md = ck.metadata
        st.fp_fusion = bool(options.get("enable_fp_fusion"))
        st.dynamic_smem = int(getattr(md, "shared", 0) or 0)
        st.threads = 32 * int(getattr(md, "num_warps", 4)) * int(getattr(md, "num_ctas", 1) or 1)
        st.ptx_fma = ptx_fma_count(ck.asm["ptx"])
        path = os.path.join(workdir, f"{name}_{arch}_{abs(hash(st.config))}.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        sass, res, loops = analyse_cubin(path, cuobjdump)
        kname = getattr(md, "name", None) or jit.__name__
        fkey = kname if kname in sass else (next(iter(sass)) if sass else None)
        fill_from_cubin(st, sass.get(fkey, collections.Counter()), res.get(fkey) or (next(iter(res.values()))
                                                                                      if res else None))
        fill_loop(st, loops.get(fkey))
    except Exception as e:  # one broken kernel must not hide the others
        st.error = f"{type(e).__name__}: {_error_line(str(e))}"
    return st


def _error_line(msg: str) -> str:
    """The telling line of a compiler error (ptxas puts the repro command last)."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and "repro" not in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else ""


def triton_stats_inprocess(module: str, archs: Iterable[int], first_config_only: bool = False,
                           names: Optional[list[str]] = None, workers: Optional[int] = None) -> list[KernelStat]:
    """Compile and analyse the registry's kernels in this process (which must not be in
    Triton's interpreter mode), spreading the compilations over `workers` processes."""
    if find_tool("cuobjdump") is None:
        raise RuntimeError("cuobjdump not found (Triton's wheel or the CUDA toolkit)")
    jobs: list[tuple[str, int, int, dict]] = []   # (module, arch, index in registry, config)
    out: list[Optional[KernelStat]] = []
    for arch in archs:
        for idx, spec in enumerate(load_registry(module, arch)):
            name = _get(spec, "name")
            if names and name not in names and _base_name(name) not in names:
                continue
            only = _get(spec, "archs")
            if only and arch not in only:
                continue
            # one entry per launch config (the nf4kit registry names them *_cfgN) ...
            if first_config_only and re.search(r"_cfg[1-9]\d*$", name):
                continue
            try:
                _, auto_cfgs = _unwrap_jit(_get(spec, "fn"))
                cfgs = list(_get(spec, "configs") or auto_cfgs or [{}])
            except Exception as e:
                jobs.append((module, arch, idx, {"__error__": f"{type(e).__name__}: {e}", "__name__": name}))
                continue
            # ... or a list of configs / an autotuner in one entry
            for cfg in (cfgs[:1] if first_config_only else cfgs):
                jobs.append((module, arch, idx, dict(cfg)))
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1, 8)
    if workers <= 1 or len(jobs) <= 2:
        return [_compile_job(j) for j in jobs]
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn: the parent may hold torch's thread pools, which fork does not copy safely
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        out = list(ex.map(_compile_job, jobs))
    return [s for s in out if s is not None]


_registry_cache: dict[tuple[str, int], list[Any]] = {}
_workdir: Optional[str] = None


def _compile_job(job: tuple[str, int, int, dict]) -> KernelStat:
    """One compilation (runs in a pool process): registry entry `idx` of `module` for `arch`."""
    global _workdir
    module, arch, idx, cfg = job
    if "__error__" in cfg:
        return KernelStat("triton", cfg["__name__"], arch, error=cfg["__error__"])
    key = (module, arch)
    if key not in _registry_cache:
        _registry_cache[key] = load_registry(module, arch)
    if _workdir is None:
        import atexit

        _workdir = tempfile.mkdtemp(prefix="nf4kit_kr_")
        atexit.register(shutil.rmtree, _workdir, True)
    return compile_triton_spec(_registry_cache[key][idx], arch, cfg, find_tool("cuobjdump"), _workdir)


def _base_name(name: str) -> str:
    return re.sub(r"_cfg\d+$", "", name)


def _cache_key(module: str, archs: list[int], first_only: bool, names: Optional[list[str]]) -> str:
    h = hashlib.sha256()
    try:
        import triton

        h.update(triton.__version__.encode())
    except Exception:
        pass
    h.update(open(__file__, "rb").read())
    h.update(repr((module, archs, first_only, names)).encode())
    try:
        spec = importlib.util.find_spec(module)
        files = []
        if spec is not None and spec.origin:
            d = os.path.dirname(spec.origin)
            files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py"))
        for f in files:
            h.update(f.encode())
            h.update(open(f, "rb").read())
    except Exception:
        h.update(b"nospec")
    return h.hexdigest()[:24]


def triton_stats(module: str = DEFAULT_REGISTRY, archs: Iterable[int] = (80, 90), first_config_only: bool = False,
                 names: Optional[list[str]] = None, use_cache: bool = True, timeout: float = 900) -> list[KernelStat]:
    """Compile and analyse every registry kernel.  Runs in a subprocess when this process has
    Triton in interpreter mode (TRITON_INTERPRET=1: its @triton.jit objects cannot be
    compiled); results are cached by (sources, Triton version, arguments)."""
    archs = list(archs)
    key = None
    if use_cache:
        key = _cache_key(module, archs, first_config_only, names)
        path = os.path.join(CACHE_DIR, key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                return [KernelStat(**d) for d in json.load(f)]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory(prefix="nf4kit_kr_") as td:
            out_json = os.path.join(td, "stats.json")
            cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--worker", "--registry", module,
                   "--archs", ",".join(map(str, archs)), "--json", out_json]
            if first_config_only:
                cmd.append("--first-config-only")
            if names:
                cmd += ["--kernels", ",".join(names)]
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0 or not os.path.exists(out_json):
                raise RuntimeError(f"kernel_report worker failed ({r.returncode}):\n{r.stderr[-3000:]}")
            with open(out_json) as f:
                stats = [KernelStat(**d) for d in json.load(f)]
    else:
        stats = triton_stats_inprocess(module, archs, first_config_only, names)
    if key is not None and not any(s.error and "Timeout" in s.error for s in stats):
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = os.path.join(CACHE_DIR, key + ".json.tmp")
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(s) for s in stats], f)
        os.replace(tmp, os.path.join(CACHE_DIR, key + ".json"))
    return stats


# ---------------------------------------------------------------- CUDA (.so)
def find_so(so: Optional[str] = None) -> Optional[str]:
    """The built extension: --so, else python/nf4kit/_C*.so, else the installed nf4kit's."""
    so = so or os.environ.get("NF4KIT_SO")
    if so:
        return so if os.path.exists(so) else None
    import glob

    cands = sorted(glob.glob(os.path.join(ROOT, "python", "nf4kit", "_C*.so")))
    if not cands:
        try:
            spec = importlib.util.find_spec("nf4kit")
            if spec and spec.origin:
                cands = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")))
        except Exception:
            pass
    return cands[0] if cands else None


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    outs = r.stdout.splitlines()
    return {n: (outs[i] if i < len(outs) else n) for i, n in enumerate(names)}


def short_cuda_name(demangled: str) -> str:
    """'void nf4kit::cuda::(anonymous namespace)::quantize_4bit_kernel<2>(const void*, …)' ->
    'quantize_4bit_kernel<2>'."""
    s = re.sub(r"^void\s+", "", demangled)
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list (the first '(' at template depth 0)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s[i:].startswith("(anonymous"):
            cut = i
            break
    s = s[:cut]
    s = re.sub(r"\(anonymous namespace\)::", "", s)
    return s.split("::")[-1] if "::" in s.split("<")[0] else s


def _threads_from_elf(cuobjdump: str, cubin: str) -> dict[str, int]:
    """Block size fixed at compile time (__launch_bounds__ / reqntid), per function."""
    try:
        text = _run([cuobjdump, "-elf", cubin])
    except Exception:
        return {}
    out: dict[str, int] = {}
    section = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\.nv\.info\.(\S+)", line.strip())
        if m:
            section = m.group(1)
            continue
        if section and ("EIATTR_MAX_THREADS" in line or "EIATTR_REQNTID" in line):
            for nxt in lines[i + 1:i + 4]:
                mv = re.search(r"Value:\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", nxt)
                if mv:
                    out[section] = int(mv.group(1), 16) * int(mv.group(2), 16) * int(mv.group(3), 16)
                    break
    return out


def cuda_stats(so: Optional[str] = None, default_threads: int = 256) -> tuple[list[KernelStat], str]:
    """Analyse every kernel in the extension's fatbin.  Returns (stats, note)."""
    path = find_so(so)
    if path is None:
        return [], "no built extension found (python/nf4kit/_C*.so); build with nvcc on PATH or pass --so"
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        return [], "cuobjdump not found"
    stats: list[KernelStat] = []
    with tempfile.TemporaryDirectory(prefix="nf4kit_so_") as td:
        try:
            listing = _run([cuobjdump, "--list-elf", path])
        except RuntimeError as e:
            if "does not contain device code" in str(e):
                return [], f"{os.path.basename(path)} holds no CUDA code (built without nvcc or NF4KIT_NO_CUDA=1)"
            return [], f"{os.path.basename(path)}: {e}"
        if "ELF file" not in listing:
            return [], f"{os.path.basename(path)} holds no CUDA code (built without nvcc?)"
        subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=td, capture_output=True, timeout=120)
        ptx_by_entry: dict[tuple[int, str], str] = {}  # (arch, entry) -> PTX body
        try:
            subprocess.run([cuobjdump, "-xptx", "all", os.path.abspath(path)], cwd=td, capture_output=True,
                           timeout=120)
            for f in sorted(os.listdir(td)):
                mp = re.search(r"sm_(\d+)a?\.ptx$", f)
                if mp:
                    for entry, body in split_ptx_entries(open(os.path.join(td, f), errors="replace").read()).items():
                        ptx_by_entry[(int(mp.group(1)), entry)] = body
        except Exception:
            pass
        for f in sorted(os.listdir(td)):
            m = re.search(r"sm_(\d+)a?\.cubin$", f)
            if not m:
                continue
            arch = int(m.group(1))
            cubin = os.path.join(td, f)
            sass, res, loops = analyse_cubin(cubin, cuobjdump)
            threads = _threads_from_elf(cuobjdump, cubin)
            dem = _demangle(list(sass))
            for fn, ops in sass.items():
                if fn.startswith("$") or "__internal" in fn:
                    continue
                nm = short_cuda_name(dem[fn])
                role = infer_role(nm)
                st = KernelStat("cuda", nm, arch, config=f"from {os.path.basename(f)}", role=role,
                                bit_exact=role in ("dequantize", "quantize"))
                st.threads = threads.get(fn, default_threads)
                st.threads_assumed = fn not in threads
                ptx = ptx_by_entry.get((arch, fn)) or next((b for (a, e), b in ptx_by_entry.items() if e == fn), None)
                st.ptx_fma = ptx_fma_count(ptx) if ptx is not None else None
                fill_from_cubin(st, ops, res.get(fn))
                fill_loop(st, loops.get(fn))
                stats.append(st)
    return stats, f"{os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}"


# ---------------------------------------------------------------- invariants
@dataclasses.dataclass
class Violation:
    kernel: str
    arch: int
    config: str
    rule: str       # "spills" | "tensor_cores" | "ldg128" | "stg128" | "fma" | "compile"
    detail: str

    def __str__(self) -> str:
        return f"{self.kernel} sm_{self.arch} [{self.config}] {self.rule}: {self.detail}"


def check_invariants(stats: Iterable[KernelStat]) -> list[Violation]:
    """The design rules (DESIGN.md §5-§6) over compiled kernels:
      spills        no kernel uses local memory (LOCAL bytes, LDL/STL)
      tensor_cores  GEMM kernels (role gemm / gemm_bwd) issue HMMA (sm_80) / HGMMA or HMMA (sm_90)
      ldg128        dequantize and GEMV kernels load global memory 16 bytes at a time
                    (LDG.128, cp.async LDGSTS.128 or TMA); a dequantize kernel may instead
                    stream the packed weight with evict-first word loads (LDG.E.EF) feeding
                    128-bit stores: the CUDA one reads 4 bytes per lane so that each warp store
                    covers 512 contiguous bytes (H100: 94% of copy, against 47% with 16-byte
                    loads and 64-byte-strided stores); a tensor-core GEMV (HMMA) may stream it with
                    evict-first 8-byte loads: the M <= 8 batch kernel's warp loads cover 8 rows x 32
                    contiguous bytes (whole sectors), because 16 bytes a lane would put two 64-wide
                    quarters' k slots into one mma, and each mma must stay in one quarter's scale
      stg128        dequantize kernels store 16 bytes at a time (STG.128 or TMA)
      fma           bit-exact kernels hold no fp32 FMA in their PTX (the nested-absmax decode is a
                    multiply then an add; enable_fp_fusion=False / __fmul_rn + __fadd_rn)
      compile       the kernel compiled at all
    """
    out: list[Violation] = []
    for s in stats:
        v = lambda rule, detail: out.append(Violation(s.name, s.arch, s.config, rule, detail))  # noqa: E731
        if s.error:
            v("compile", s.error)
            continue
        if s.spills:
            v("spills", f"local {s.local} B/thread, stack {s.stack} B, {s.ldl} LDL, {s.stl} STL")
        if s.role in ("gemm", "gemm_bwd"):
            if s.arch >= 90 and s.hgmma + s.hmma == 0:
                v("tensor_cores", "no HGMMA/HMMA on sm_90")
            elif s.arch < 90 and s.hmma == 0:
                v("tensor_cores", "no HMMA on sm_80")
        streamed = (s.role == "dequantize" and s.ldg_stream > 0 and s.stg128 + s.tma_store > 0) or \
            (s.role == "gemv" and s.ldg_stream > 0 and s.hmma > 0)
        if s.role in ("dequantize", "gemv") and s.ldg128 + s.ldgsts128 + s.tma_load == 0 and not streamed:
            v("ldg128", f"{s.ldg} global loads, none 128-bit (nor evict-first words feeding 128-bit stores "
                        "or tensor cores)")
        if s.role == "dequantize" and s.stg128 + s.tma_store == 0:
            v("stg128", f"{s.stg} global stores, none 128-bit")
        if s.bit_exact and s.ptx_fma:
            v("fma", f"{s.ptx_fma} fma.rn.f32 in the PTX of a bit-exact kernel")
    return out


# ---------------------------------------------------------------- report
def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(stats: list[KernelStat], notes: list[str], violations: list[Violation],
             demo_violations: Optional[list[Violation]] = None) -> str:
    head = ("| kernel | role | sm | config | threads | regs | spill (local B / LDL / STL) | smem | HMMA | HGMMA | "
            "LDG 128/all | cp.async128 / TMA | STG 128/all | PTX fma | occupancy (blocks, limiter) | "
            "H100 floor (case) |")
    sep = "|" + "---|" * 16
    lines = ["# nf4kit static kernel report", "",
             "Generated by `python -m benchmarks.kernel_report` on a machine without a GPU: Triton kernels compiled "
             "with `triton.compile(ASTSource, GPUTarget('cuda', arch, 32))`, CUDA kernels read from the built "
             "extension's fatbin, both disassembled with cuobjdump.  Occupancy is an estimate from registers, "
             "shared memory and threads (CUDA kernels without `__launch_bounds__`: 256 threads assumed, marked *). "
             "The floor is the H100 roofline (3.0 TB/s, 800 TFLOP/s) of the kernel's role at the headline shape.",
             ""]
    lines += [f"- {n}" for n in notes] + [""]
    for source in ("triton", "cuda", "demo"):
        rows = [s for s in stats if s.source == source]
        if not rows:
            continue
        lines += [f"## {source} kernels", "", head, sep]
        for s in rows:
            if s.error:
                lines.append(f"| {s.name} | {s.role} | {s.arch} | {s.config} | compile error: {s.error} "
                             "| | | | | | | | | | | |")
                continue
            spill = ("none" if not s.spills else f"**{s.local} / {s.ldl} / {s.stl}**") + (
                f" (stack {s.stack})" if s.stack else "")
            occ = f"{_pct(s.occupancy)} ({s.blocks_per_sm}, {s.occ_limiter})" if s.occupancy is not None else ""
            lines.append(
                f"| {s.name} | {s.role}{' (bit-exact)' if s.bit_exact else ''} | {s.arch} | {s.config} | "
                f"{s.threads}{'*' if s.threads_assumed else ''} | {s.regs} | {spill} | {s.smem} | {s.hmma} | "
                f"{s.hgmma} | {s.ldg128}/{s.ldg} | {s.ldgsts128} / {s.tma_load} | {s.stg128}/{s.stg} | "
                f"{'' if s.ptx_fma is None else s.ptx_fma} | {occ} | "
                f"{rl.format_time(s.floor_s) + ' (' + s.floor_case + ')' if s.floor_s else ''} |")
        lines.append("")
    loop_rows = [s for s in stats if s.loop_per_weight is not None]
    if loop_rows:
        lines += ["## Decode GEMVs: main-loop instructions per weight (static SASS)", "",
                  "The widest loop of each M = 1 decode kernel (and of the tensor-core batch kernel, "
                  "M <= 16, and table GEMM, M <= 64, experimental): its instructions (both sides of any branch inside it counted once) over the "
                  "weights one lane multiplies per iteration (8 per A fragment of HMMA m16n8k16; without "
                  "tensor cores one per FFMA, which slightly overcounts weights).  On the H100 the time "
                  "does not follow this count: the M = 1 stream kernels measured 22-28 us at 4.8-6.1 per "
                  "weight, the tensor-core kernel 24 us at 1.9 (benchmarks/results/gpu_h100_2026-11-27b).", "",
                  "| kernel | sm | config | loop instructions | weights per lane | per weight |", "|---|---|---|---|---|---|"]
        for s in loop_rows:
            lines.append(f"| {s.name} | {s.arch} | {s.config} | {s.loop_instr} | {s.loop_weights} | "
                         f"{s.loop_per_weight:.2f} |")
        lines.append("")
    lines += ["## Invariants", ""]
    if violations:
        lines += [f"- VIOLATION {v}" for v in violations]
    else:
        lines.append("- all invariants hold (no spills; GEMMs on tensor cores; 128-bit loads in dequantize/GEMV; "
                     "128-bit stores in dequantize; no FMA in bit-exact kernels)")
    if demo_violations:
        lines += ["", "Expected violations of the deliberately broken demo kernels (the checker works):", ""]
        lines += [f"- {v}" for v in demo_violations]
    lines += ["", "## Roofline floors (H100 nominal)", "", rl.markdown_table(rl.standard_table(rl.H100), rl.H100), ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--so", default=None, help="the built extension (default python/nf4kit/_C*.so)")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="module with the Triton kernel registry")
    p.add_argument("--kernels", default=None, help="comma list of registry names (default: all)")
    p.add_argument("--first-config-only", action="store_true", help="one config per kernel (fast)")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--demo", action="store_true", help="also report the demo kernels (benchmarks._demo_kernels)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown report path ('-' for none)")
    p.add_argument("--json", default=None)
    p.add_argument("--check", action="store_true", help="exit 1 if an invariant is violated")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    names = args.kernels.split(",") if args.kernels else None

    if args.worker:  # compile in this (non-interpreter) process, write JSON, nothing else
        stats = triton_stats_inprocess(args.registry, archs, args.first_config_only, names)
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(s) for s in stats], f)
        return 0

    stats: list[KernelStat] = []
    notes: list[str] = []
    try:
        import triton

        tool = find_tool("cuobjdump") or "not found"
        if "site-packages" in tool:
            tool = tool.split("site-packages" + os.sep)[-1] + " (Triton's wheel)"
        notes.append(f"Triton {triton.__version__}; cuobjdump: {tool}")
    except Exception:
        notes.append("Triton not installed: no Triton kernels")
        args.no_triton = True
    if not args.no_triton:
        try:
            tstats = triton_stats(args.registry, archs, args.first_config_only, names, use_cache=not args.no_cache)
            stats += tstats
            notes.append(f"Triton registry {args.registry}: {len({s.name for s in tstats})} kernels, "
                         f"{len(tstats)} compilations")
        except ModuleNotFoundError as e:
            notes.append(f"Triton registry {args.registry} not found ({e}); no Triton kernels reported")
        except Exception as e:
            notes.append(f"Triton registry {args.registry} failed: {type(e).__name__}: {str(e)[:400]}")
    if args.demo:
        dstats = triton_stats("benchmarks._demo_kernels", archs, False, None, use_cache=not args.no_cache)
        for s in dstats:
            s.source = "demo"
        stats += dstats
    if not args.no_cuda:
        cstats, note = cuda_stats(args.so)
        stats += [s for s in cstats if s.arch in archs or not archs]
        notes.append(f"CUDA: {note}" + (f": {len({s.name for s in cstats})} kernels" if cstats else ""))
    violations = check_invariants([s for s in stats if s.source != "demo"])
    demo_v = check_invariants([s for s in stats if s.source == "demo"])
    md = markdown(stats, notes, violations, demo_v)
    if args.out and args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"notes": notes, "stats": [dataclasses.asdict(s) for s in stats],
                       "violations": [dataclasses.asdict(v) for v in violations]}, f, indent=1)
    for n in notes:
        print(n)
    print(f"{len(stats)} kernel compilations analysed; {len(violations)} invariant violation(s)"
          + (f" (+{len(demo_v)} in the deliberately broken demo kernels)" if args.demo else ""))
    for v in violations:
        print("  VIOLATION", v)
    if args.out and args.out != "-":
        print(f"report: {os.path.relpath(args.out, os.getcwd())}")
    return 1 if (args.check and violations) else 0


if __name__ == "__main__":
    sys.exit(main())
