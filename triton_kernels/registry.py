"""Every @triton.jit kernel of nf4kit.triton_kernels with example signatures and constexprs,
one entry per launch configuration (autotune configs included), for static compilation
without a GPU:

    from nf4kit.triton_kernels import registry
    for spec in registry.kernel_specs(arch=90):
        ck = registry.compile_spec(spec, arch=90)     # triton.compile(ASTSource, GPUTarget)
        ck.asm["ptx"], ck.asm["cubin"], ck.metadata.shared, ck.n_regs (after ck._init_handles())

Run in a process WITHOUT TRITON_INTERPRET=1 (under the interpreter @triton.jit returns an
interpreted function that cannot be compiled).  The example shapes are Llama-like (K = 4096,
blocksize 64, double quant, bf16 activations, LoRA on); pointer arguments and the integer
arguments listed in `divisible` get Triton's 16-divisibility specialization, as a real launch
with those sizes would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import triton


@dataclass
class KernelSpec:
    name: str                       # unique: kernel name + variant + config
    fn: Any                         # the triton.runtime.JITFunction
    signature: dict[str, str]       # runtime args -> Triton type ("*bf16", "i32", "fp32", ...)
    constexprs: dict[str, Any]      # constexpr args -> value
    divisible: tuple[str, ...] = () # int args specialised as divisible by 16
    options: dict[str, Any] = field(default_factory=dict)  # num_warps, num_stages, enable_fp_fusion
    exact: bool = False             # must be bit-exact: expect no fma / approx div in the PTX


def _quant_specs() -> list[KernelSpec]:
    from . import quant as Q

    specs = []
    for bs in (64, 4096):
        rows = max(1, 4096 // bs)
        specs.append(KernelSpec(
            f"quantize_4bit_bs{bs}", Q._quantize_4bit_kernel,
            {"x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "mid_ptr": "*fp32", "order_ptr": "*i32",
             "n": "i32", "nbytes": "i32", "nb": "i32"},
            {"BS": bs, "ROWS": rows, "FP4": False}, ("n", "nbytes", "nb"),
            {"num_warps": 4 if bs * rows <= 2048 else 8, "enable_fp_fusion": False}, exact=True))
    for nested in (True, False):
        specs.append(KernelSpec(
            f"dequantize_4bit_{'nested' if nested else 'plain'}", Q._dequantize_4bit_kernel,
            {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "nabs_ptr": "*fp32",
             "ncode_ptr": "*fp32", "offset_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32",
             "nbytes": "i32", "nb": "i32"},
            {"BS": 64, "NESTED": nested, "BLOCK": Q.DEQUANT_BLOCK, "INTERP": False}, ("n", "nbytes", "nb"),
            {"num_warps": Q.DEQUANT_WARPS, "enable_fp_fusion": False}, exact=True))
    specs.append(KernelSpec(
        "quantize_blockwise_bs256", Q._quantize_blockwise_kernel,
        {"x_ptr": "*fp32", "q_ptr": "*u8", "absmax_ptr": "*fp32", "mid_ptr": "*fp32", "n": "i32", "nb": "i32"},
        {"BS": 256, "ROWS": 16}, ("n", "nb"), {"num_warps": 8, "enable_fp_fusion": False}, exact=True))
    specs.append(KernelSpec(
        "dequantize_blockwise_bs256", Q._dequantize_blockwise_kernel,
        {"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "nb": "i32"},
        {"BS": 256, "BLOCK": Q.DEQUANT_BLOCK, "INTERP": False}, ("n", "nb"),
        {"num_warps": Q.DEQUANT_WARPS, "enable_fp_fusion": False}, exact=True))
    return specs


def _matmul_specs(arch: int) -> list[KernelSpec]:
    from . import matmul as MM

    cap = (arch // 10, arch % 10)
    state = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nabs_ptr": "*fp32", "ncode_ptr": "*fp32",
             "offset_ptr": "*fp32", "table_ptr": "*fp32"}
    common = {"BS": 64, "NESTED": True, "K_ALIGN": 4096, "HAS_LORA": True, "R_PAD": 16, "INTERP": False,
              "IEEE": False}
    specs = []
    for large in (False, True):
        for fwd in (True, False):
            for i, cfg in enumerate(MM.fused_configs(cap, large)):
                sig = {"x_ptr": "*bf16", **state, "bias_ptr": "*bf16", "l_ptr": "*bf16", "rm_ptr": "*bf16",
                       "out_ptr": "*bf16", "M": "i32", "P": "i32", "Q": "i32", "N": "i32", "K": "i32",
                       "stride_wb": "i32", "stride_xm": "i32", "stride_om": "i32", "stride_lm": "i32",
                       "stride_rr": "i32", "stride_rp": "i32", "RANK": "i32", "lora_scale": "fp32",
                       "M_BUCKET": "i32"}
                specs.append(KernelSpec(
                    f"fused_matmul_{'fwd' if fwd else 'bwd'}_{'large' if large else 'medium'}_cfg{i}",
                    MM._fused_matmul_kernel, sig,
                    {**common, "FWD": fwd, "HAS_BIAS": fwd, **cfg.kwargs},
                    ("M", "P", "Q", "N", "K", "stride_wb", "stride_xm", "stride_om", "stride_lm", "RANK"),
                    {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    for m_one in (True, False):
        for i, cfg in enumerate(MM.gemv_configs(cap, m_one)):
            sig = {"x_ptr": "*bf16", **state, "bias_ptr": "*bf16", "l_ptr": "*bf16", "b_ptr": "*bf16",
                   "out_ptr": "*bf16", "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_wb": "i32",
                   "stride_xm": "i32", "stride_om": "i32", "stride_lm": "i32", "RANK": "i32", "lora_scale": "fp32",
                   "M_BUCKET": "i32"}
            specs.append(KernelSpec(
                f"gemv_{'m1' if m_one else 'm16'}_cfg{i}", MM._gemv_kernel, sig,
                {**common, "HAS_BIAS": True, **cfg.kwargs},
                ("N", "K", "stride_wb", "stride_xm", "stride_om", "stride_lm", "RANK"),
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    cfg = MM.STREAM_CONFIG
    specs.append(KernelSpec(
        "gemv_stream_m1", MM._gemv_stream_kernel,
        {"x_ptr": "*bf16", **state, "ws_ptr": "*fp32", "N": "i32", "K": "i32", "stride_wb": "i32",
         "ROW_BLOCK_STEP": "i32"},
        {"BS": 64, "NESTED": True, "INTERP": False, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
         "PDL": False},
        ("N", "K", "stride_wb"), {"num_warps": cfg["warps"], "num_stages": 1}))
    specs.append(KernelSpec(
        "splitk_reduce", MM._splitk_reduce_kernel,
        {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "l_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32",
         "N": "i32", "stride_om": "i32", "stride_lm": "i32", "RANK": "i32", "lora_scale": "fp32"},
        {"SPLIT_K": 2, "HAS_BIAS": True, "HAS_LORA": True, "R_PAD": 16, "INTERP": False, "BLOCK_N": 128,
         "PDL": False},
        ("N", "stride_om", "stride_lm", "RANK"), {"num_warps": 4}))
    if arch >= 90 and MM._HAS_GDC:  # STREAM_PDL's variants (griddepcontrol is sm_90+)
        stream, reduce = specs[-2], specs[-1]
        specs.append(KernelSpec("gemv_stream_m1_pdl", stream.fn, stream.signature, {**stream.constexprs, "PDL": True},
                                stream.divisible, stream.options))
        specs.append(KernelSpec("splitk_reduce_pdl", reduce.fn, reduce.signature, {**reduce.constexprs, "PDL": True},
                                reduce.divisible, {**reduce.options, "launch_pdl": True}))
    return specs


def kernel_specs(arch: int = 90) -> list[KernelSpec]:
    """Every kernel x launch configuration used on compute capability `arch` (80, 86, 89, 90)."""
    return _quant_specs() + _matmul_specs(arch)


def compile_spec(spec: KernelSpec, arch: int = 90):
    """triton.compile the spec for sm_`arch` on this machine (no GPU needed) -> CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("compile_spec needs real JIT functions: run without TRITON_INTERPRET=1")
    names = fn.arg_names
    sig = {**spec.signature, **{k: "constexpr" for k in spec.constexprs}}
    attrs = {(names.index(a),): [["tt.divisibility", 16]]
             for a, t in spec.signature.items() if t.startswith("*") or a in spec.divisible}
    src = ASTSource(fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def compile_all(arch: int = 90) -> dict[str, Any]:
    """{spec.name: CompiledKernel} for every spec (takes a minute or two on 2 cores)."""
    return {s.name: compile_spec(s, arch) for s in kernel_specs(arch)}
