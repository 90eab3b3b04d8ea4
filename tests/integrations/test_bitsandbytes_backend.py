"""nf4kit as bitsandbytes' kernel backend: bitsandbytes' own API gives the same results with
nf4kit's kernels registered as without them, and nf4kit's kernels are the ones that ran."""
from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import nf4kit

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from nf4kit import reference  # noqa: E402
from nf4kit.integrations import bitsandbytes as nbnb  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Each test starts from stock bitsandbytes and leaves the registration as it found it
    (the installed entry point may have enabled nf4kit when bitsandbytes was imported)."""
    was = nbnb.is_enabled()
    nbnb.disable()
    yield
    nbnb.disable()
    if was:
        nbnb.enable()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def counts_delta(before):
    return {k: v - before.get(k, 0) for k, v in nbnb.call_counts.items() if v - before.get(k, 0)}


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("shape", [(67, 128), (3, 100)])   # odd rows; a tail block of 44
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_functional_same_with_and_without(quant_type, compress, dtype, shape):
    torch.manual_seed(1)
    W = torch.randn(*shape, dtype=dtype)
    x = torch.randn(3, 5, shape[1], dtype=dtype)
    p0, s0 = BF.quantize_4bit(W, blocksize=64, compress_statistics=compress, quant_type=quant_type)
    d0 = BF.dequantize_4bit(p0, s0)
    y0 = bnb.matmul_4bit(x, p0.t(), s0)

    before = dict(nbnb.call_counts)
    with nbnb.enabled():
        p1, s1 = BF.quantize_4bit(W, blocksize=64, compress_statistics=compress, quant_type=quant_type)
        d_same = BF.dequantize_4bit(p0, s0)       # stock-made state, nf4kit kernel
        d1 = BF.dequantize_4bit(p1, s1)
        y1 = bnb.matmul_4bit(x, p0.t(), s0)
    ran = counts_delta(before)
    assert ran.get(("quantize_4bit", "cpu")) == 1 and ran.get(("dequantize_4bit", "cpu")) == 2
    assert ran.get(("gemm_4bit", "cpu")) == 1
    if compress:
        assert ran.get(("quantize_blockwise", "cpu")) == 1

    assert torch.equal(p0, p1)                    # 4-bit codes bit-identical
    assert torch.equal(d0, d_same)                # dequantize bit-identical on the same state
    assert torch.equal(d_same.reshape(-1), _ref_dequant(p0, s0))
    if compress:
        # bitsandbytes' CPU nested quantizer is an approximate LUT, nf4kit's is the exact
        # nearest code: codes may differ by one step, rarely.
        a0, a1 = s0.absmax.int(), s1.absmax.int()
        assert (a0 - a1).abs().max() <= 1 and (a0 != a1).float().mean() < 0.05
        assert torch.equal(s0.state2.absmax, s1.state2.absmax)
    else:
        assert torch.equal(s0.absmax, s1.absmax)
        assert torch.equal(d0, d1)
    # matmul: the same as stock, and right against a float64 reference
    ref = x.double() @ d0.double().t()
    assert rel(y1, ref) < TOL[dtype]
    assert rel(y1, y0) < 2 * TOL[dtype]


def _ref_dequant(packed, qs) -> torch.Tensor:
    """nf4kit's reference dequantize of a bitsandbytes QuantState."""
    args = ((qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset.float()) if qs.nested
            else (qs.absmax, None, None, None))
    return reference.dequantize_4bit(packed.reshape(-1).view(torch.uint8), *args, qs.blocksize, qs.quant_type,
                                     qs.shape.numel(), qs.dtype)


@pytest.mark.parametrize("shape", [(8, 96), (5, 32), (3, 160)])
def test_rows_crossing_blocks_are_right(shape):
    """Blocks that cross rows (K not a multiple of the blocksize).  bitsandbytes 0.50.2's
    AVX-512 CPU dequantize_4bit gets some of these shapes wrong; with nf4kit registered,
    bitsandbytes' dequantize and matmul follow the format exactly."""
    torch.manual_seed(7)
    W = torch.randn(*shape)
    x = torch.randn(4, shape[1])
    p, s = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    with nbnb.enabled():
        d = BF.dequantize_4bit(p, s)
        y = bnb.matmul_4bit(x, p.t(), s)
    assert torch.equal(d.reshape(-1), _ref_dequant(p, s))
    assert rel(y, x.double() @ d.double().t()) < 1e-5


def test_quant_storage_bf16_and_out_variants():
    torch.manual_seed(2)
    W = torch.randn(64, 80)
    p0, s0 = BF.quantize_4bit(W, blocksize=128, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.bfloat16)
    d0 = _ref_dequant(p0, s0).view(64, 80)
    x = torch.randn(1, 80)
    with nbnb.enabled():
        p1, s1 = BF.quantize_4bit(W, blocksize=128, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.bfloat16)
        assert p1.dtype == torch.bfloat16 and p1.shape == p0.shape
        assert torch.equal(p0.view(torch.uint8), p1.view(torch.uint8))
        out = torch.empty(64, 80)
        ptr = out.data_ptr()
        BF.dequantize_4bit(p0, s0, out=out)       # dequantize_4bit.out (bf16-stored bytes)
        assert torch.equal(out, d0) and out.data_ptr() == ptr
        assert nf4kit.backends.last_backend["dequantize_4bit_out"] == "cpu"   # written in place
        gout = torch.empty(1, 64)
        BF.gemv_4bit(x, p0.t(), out=gout, state=s0)   # gemv_4bit.out (nested absmax decoded by bnb)
        assert rel(gout, x.double() @ d0.double().t()) < 1e-5
        q8, s8 = BF.quantize_blockwise(W, blocksize=256)
        o8 = torch.empty(64, 80)
        BF.dequantize_blockwise(q8, s8, out=o8)   # dequantize_blockwise.out
        assert torch.equal(o8, reference.dequantize_blockwise(q8.reshape(-1), s8.absmax, s8.code, 256,
                                                              torch.float32).view(64, 80))
    assert nbnb.call_counts[("dequantize_4bit", "cpu")] and nbnb.call_counts[("gemv_4bit", "cpu")]


@pytest.mark.parametrize("blocksize", [256, 4096, 100])
def test_blockwise_8bit_exact_nearest(blocksize):
    """quantize_blockwise is the exact nearest code (reference.py), any block size bnb accepts."""
    torch.manual_seed(3)
    A = torch.randn(33, 129)
    q0, s0 = BF.quantize_blockwise(A, blocksize=blocksize)
    with nbnb.enabled():
        q1, s1 = BF.quantize_blockwise(A, blocksize=blocksize)
        a1 = BF.dequantize_blockwise(q1, s1)
    qr, ar = reference.quantize_blockwise(A, s0.code, blocksize)
    assert torch.equal(q1.reshape(-1), qr) and torch.equal(s1.absmax, ar)
    assert torch.equal(s0.absmax, s1.absmax)
    assert (q0.int() - q1.int()).abs().max() <= 1          # stock CPU: LUT, off by one at most
    assert torch.equal(a1.reshape(-1), reference.dequantize_blockwise(q1, s1.absmax, s1.code, blocksize,
                                                                      torch.float32))


def _bnb_linear(lin: torch.nn.Linear, quant_type="nf4", compress=True) -> "bnb.nn.Linear4bit":
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                              compress_statistics=compress, quant_type=quant_type)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # quantizes


def test_cpu_layout_converted_once_per_layer(monkeypatch):
    """bitsandbytes' CPU eval layout is converted back once per layer, not per call (the per-call
    conversion made a bitsandbytes 4-bit decode 5x slower than stock): a new view of the same
    weight hits the cache; an in-place change of either tensor converts again; the entry goes
    with the layer's absmax."""
    import gc

    N, K, bs = 64, 256, 64
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    absmax = torch.rand(K // bs, N, generator=g).to(torch.bfloat16)
    calls = []
    real = nbnb._unpack_cpu_layout
    monkeypatch.setattr(nbnb, "_unpack_cpu_layout", lambda *a: calls.append(1) or real(*a))
    p1, a1 = nbnb._unpack_cpu_layout_cached(weight[:], absmax, N, K)
    p2, a2 = nbnb._unpack_cpu_layout_cached(weight[:], absmax, N, K)   # a fresh view (bitsandbytes passes weight.t().t())
    assert len(calls) == 1 and p2 is p1 and a2 is a1
    exp_p, exp_a = real(weight, absmax, N, K)
    assert torch.equal(p1, exp_p) and torch.equal(a1, exp_a)
    weight[0, 0] ^= 0xFF                                                   # the weight changed in place
    p3, _ = nbnb._unpack_cpu_layout_cached(weight[:], absmax, N, K)
    assert len(calls) == 2 and torch.equal(p3, real(weight, absmax, N, K)[0])
    absmax.mul_(2)                                                         # so did the absmax
    _, a4 = nbnb._unpack_cpu_layout_cached(weight[:], absmax, N, K)
    assert len(calls) == 3 and torch.equal(a4, real(weight, absmax, N, K)[1])
    key = id(absmax)
    assert key in nbnb._cpu_layout_cache
    del absmax, a1, a2, a4
    gc.collect()
    assert key not in nbnb._cpu_layout_cache


def test_code_table_identified_once_per_tensor(monkeypatch):
    """gemv_4bit identifies bitsandbytes' quant_map once per tensor, not per call: reading it back
    to the host on every call was a device sync per decode step on CUDA.  The second call must not
    read the tensor at all; an in-place change identifies it again; the entry goes with the tensor."""
    import gc

    from nf4kit import format as fmt

    code = fmt.code_table("nf4")
    assert nbnb._table_type(code) == "nf4"
    real_cpu = torch.Tensor.cpu

    def no_host_copy(self, *a, **k):
        raise AssertionError("the quant_map was read back again")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    assert nbnb._table_type(code) == "nf4"
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    code[3] += 1.0                                                         # no longer the NF4 table
    assert nbnb._table_type(code) is None
    code.copy_(fmt.code_table("fp4"))
    assert nbnb._table_type(code) == "fp4"
    assert nbnb._table_type(fmt.code_table("fp4")[:8]) is None            # not 16 entries
    key = id(code)
    assert key in nbnb._table_type_cache
    del code
    gc.collect()
    assert key not in nbnb._table_type_cache
    # The nf4kit state's code table is copied to a device once, not per call.
    absmax = torch.rand(4)
    s1 = nbnb._nf4kit_state((4, 64), absmax, 64, "nf4", torch.float32)
    s2 = nbnb._nf4kit_state((4, 64), absmax, 64, "nf4", torch.float32)
    assert s1.code is s2.code and torch.equal(s1.code, fmt.code_table("nf4"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_train_and_eval_paths(quant_type):
    """bitsandbytes.nn.Linear4bit: the training path (gemm_4bit with the nested state) and the
    eval path (on AVX512-BF16 CPUs: gemv_4bit on bitsandbytes' repacked CPU layout)."""
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(3, 5, 64)
    stock = _bnb_linear(lin, quant_type)
    ref_w = BF.dequantize_4bit(stock.weight, stock.weight.quant_state).double()  # before any repacking
    y_train0 = stock(x)
    stock.eval()
    with torch.no_grad():
        y_eval0 = stock(x)

    before = dict(nbnb.call_counts)
    with nbnb.enabled():
        mine = _bnb_linear(lin, quant_type)
        y_train1 = mine(x)
        y_train1.sum().backward()                 # bitsandbytes' backward dequantizes through us
        mine.eval()
        with torch.no_grad():
            y_eval1 = mine(x)
        cpu_layout = getattr(mine.weight.quant_state, "packing_format_for_cpu", False)
        absmax_eval = mine.weight.quant_state.absmax
    ran = counts_delta(before)
    assert ran.get(("gemm_4bit", "cpu"), 0) >= 1 and ran.get(("quantize_4bit", "cpu")) == 1
    assert ran.get(("gemv_4bit", "cpu") if cpu_layout else ("gemm_4bit", "cpu"), 0) >= 1

    ref = x.double() @ ref_w.t() + lin.bias.detach().double()
    assert rel(y_train1, ref) < 1e-5 and rel(y_train0, y_train1) < 1e-5
    if cpu_layout:
        # bitsandbytes' CPU layout rounds absmax to bf16 and computes in bf16: nf4kit keeps
        # the bf16 absmax it is given and computes in fp32.
        ref_bf = BF.dequantize_4bit(stock_copy_weight(lin, quant_type), absmax_bf16_state(lin, quant_type)).double()
        assert rel(y_eval1, x.double() @ ref_bf.t() + lin.bias.detach().double()) < 1e-5
        assert absmax_eval.dtype == torch.bfloat16
        assert rel(y_eval1, y_eval0) < 1e-2
    else:
        assert rel(y_eval1, y_eval0) < 1e-5


def stock_copy_weight(lin, quant_type):
    return _bnb_linear(lin, quant_type).weight


def absmax_bf16_state(lin, quant_type):
    """The stock quant state with its absmax decoded and rounded to bf16 (as bnb's CPU layout)."""
    w = _bnb_linear(lin, quant_type).weight
    qs = w.quant_state
    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return BF.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=qs.shape, code=qs.code,
                         blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)


def test_disable_restores_stock_kernels():
    torch.manual_seed(5)
    W = torch.randn(32, 64)
    nbnb.enable()
    nbnb.enable()                                  # idempotent
    nbnb.disable()
    before = dict(nbnb.call_counts)
    p, s = BF.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    BF.dequantize_4bit(p, s)
    bnb.matmul_4bit(torch.randn(2, 64), p.t(), s)
    assert counts_delta(before) == {}



# ---------------------------------------------------------------- overriding bitsandbytes' own kernels
def _strict_library_impl(orig, flag: bool):
    """``torch.library.Library.impl`` as torch 2.11 has it (flag=True: ``allow_override``,
    False by default) or as a torch without the flag has it (flag=False): either refuses to
    register for a (namespace, op, dispatch key) that already has a kernel registered from
    Python, unless told.  torch 2.13 (CI) allows it by default, so without this the collision
    with bitsandbytes' own kernels would not show here.  Self-contained: its source is also
    run in subprocesses."""
    import inspect

    import torch

    has_flag = "allow_override" in inspect.signature(orig).parameters
    passthrough = {"allow_override": True} if has_flag else {}

    def check(self, op_name, dispatch_key):
        key = f"{self.ns}/{str(op_name).split('::')[-1]}/{dispatch_key or self.dispatch_key}"
        if key in torch.library._impls:
            raise RuntimeError("This is not allowed since there's already a kernel registered from python "
                               f"overriding {key}")

    if flag:
        def impl(self, op_name, fn, dispatch_key="", *, with_keyset=False, allow_override=False):
            if not allow_override:
                check(self, op_name, dispatch_key)
            return orig(self, op_name, fn, dispatch_key, with_keyset=with_keyset, **passthrough)
    else:
        # no flag in the signature; torch's own internals of this version may still pass it
        def impl(self, op_name, fn, dispatch_key="", *, with_keyset=False, **internal):
            if not internal.get("allow_override", False):
                check(self, op_name, dispatch_key)
            return orig(self, op_name, fn, dispatch_key, with_keyset=with_keyset, **passthrough)
    return impl


_TORCH_HAS_OVERRIDE_FLAG = "allow_override" in inspect.signature(torch.library.Library.impl).parameters
LIBRARY_MODES = ["native", "torch_2_11", "no_flag"]


@pytest.fixture(params=LIBRARY_MODES)
def library_mode(request, monkeypatch):
    """torch.library as this torch has it, as torch 2.11 has it, as a torch without the flag."""
    if request.param != "native":
        if request.param == "torch_2_11" and not _TORCH_HAS_OVERRIDE_FLAG:
            pytest.skip("this torch has no allow_override flag ('native' is the no-flag case)")
        orig = torch.library.Library.impl
        monkeypatch.setattr(torch.library.Library, "impl", _strict_library_impl(orig, request.param == "torch_2_11"))
    return request.param


def _python_kernel_keys() -> set:
    return {k for k in torch.library._impls if k.startswith("bitsandbytes/")}


@pytest.fixture
def stock_cuda_kernels(library_mode):
    """bitsandbytes' CUDA kernels, registered from Python as bitsandbytes does on a GPU machine
    (``backends/cuda/ops.py``: ``torch.library.register_kernel("bitsandbytes::<op>", "cuda")``).
    Without a GPU bitsandbytes registers none, so stand-ins that record their calls take their
    place (registering for the CUDA key needs no GPU); on a GPU machine its own are there."""
    if "bitsandbytes/quantize_4bit/CUDA" in torch.library._impls and torch.cuda.is_available():
        yield None                                   # bitsandbytes' real CUDA kernels
        return
    calls = []

    def make(op):
        def stock(*args, **kwargs):
            calls.append(op)
            if op == "quantize_4bit":
                return torch.zeros((1, 1), dtype=torch.uint8), torch.zeros(1)
            raise AssertionError(f"stand-in for {op} not meant to be called")
        return stock

    lib = torch.library.Library("bitsandbytes", "FRAGMENT")  # noqa: TOR901
    for op in nbnb.OPS:
        torch.library.register_kernel(f"bitsandbytes::{op}", "cuda", make(op), lib=lib)
    yield calls
    lib._destroy()


def _cuda_quantize_ran_nf4kit(stand_in_calls) -> bool:
    """Calls bitsandbytes::quantize_4bit through its CUDA kernel; True if nf4kit's ran."""
    before, n_stock = dict(nbnb.call_counts), len(stand_in_calls or ())
    if stand_in_calls is None:                       # a GPU: bitsandbytes' own CUDA kernels
        BF.quantize_4bit(torch.randn(32, 64, device="cuda"), quant_type="nf4", compress_statistics=False)
    else:                                            # no GPU: dispatch to the CUDA key by hand
        torch.ops.bitsandbytes.quantize_4bit.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), torch.randn(32, 64), 64, "nf4", torch.uint8)
    ran_nf4kit = bool(counts_delta(before))
    if stand_in_calls is not None:
        assert ran_nf4kit != (len(stand_in_calls) > n_stock)
    return ran_nf4kit


def test_enable_overrides_bitsandbytes_python_kernels(stock_cuda_kernels, library_mode):
    """The GPU machine's failure (torch 2.11): bitsandbytes had registered its CUDA kernels
    from Python, so registering nf4kit's for the same keys raised "already a kernel registered
    from python".  enable() overrides them on any torch; disable() brings them back, and
    torch's record of bitsandbytes' Python kernels is as it was (no stale or lost keys)."""
    keys = _python_kernel_keys()
    assert "bitsandbytes/quantize_4bit/CUDA" in keys
    assert not _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    assert nbnb.enable() is True and nbnb.is_enabled()
    assert _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    before = dict(nbnb.call_counts)                  # the CPU key as well (bitsandbytes' CPU kernels)
    BF.dequantize_4bit(*BF.quantize_4bit(torch.randn(8, 64), quant_type="nf4", compress_statistics=True))
    assert counts_delta(before) == {("quantize_4bit", "cpu"): 1, ("quantize_blockwise", "cpu"): 1,
                                    ("dequantize_blockwise", "cpu"): 1, ("dequantize_4bit", "cpu"): 1}
    nbnb.disable()
    import gc

    gc.collect()                                     # a collected fragment drops its keys too
    assert not _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    assert _python_kernel_keys() == keys
    # and again: enable / disable cycles leave nothing behind
    with nbnb.enabled():
        assert _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    assert not _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    assert _python_kernel_keys() == keys


def test_enable_failure_leaves_stock_kernels(stock_cuda_kernels, library_mode, monkeypatch):
    """A registration that fails half-way removes the half that was made."""
    keys = _python_kernel_keys()
    kernels = dict(nbnb._KERNELS)
    kernels["gemm_4bit"] = "not callable"            # Library.impl raises TypeError at this op
    monkeypatch.setattr(nbnb, "_KERNELS", kernels)
    with pytest.raises(TypeError):
        nbnb.enable()
    assert not nbnb.is_enabled()
    assert not _cuda_quantize_ran_nf4kit(stock_cuda_kernels)
    assert _python_kernel_keys() == keys

def test_entry_point_never_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(nbnb, "enable", boom)
    monkeypatch.setenv(nbnb.ENV_VAR, "1")          # the suite's conftest switches it off
    with pytest.warns(RuntimeWarning, match="could not register"):
        nbnb.entry_point()
    assert not nbnb.is_enabled()
    monkeypatch.setenv(nbnb.ENV_VAR, "0")
    nbnb.entry_point()                             # switched off: nothing, no warning


_EP_SCRIPT = textwrap.dedent("""
    import torch, bitsandbytes as bnb
    from nf4kit.integrations import bitsandbytes as nb
    lin = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    lin(torch.randn(2, 64))
    print("ENABLED", nb.is_enabled(), "GEMM", nb.call_counts[("gemm_4bit", "cpu")],
          "DEVICES", ",".join(nb.registered_devices()) or "-")
""")


@pytest.mark.parametrize("env", ["1", None, "0"], ids=["all", "unset", "off"])
def test_entry_point_discovered_by_bitsandbytes(tmp_path, env, library_mode="native"):
    """bitsandbytes finds the entry point through importlib.metadata: install a throwaway
    dist-info that declares it (what pyproject's [project.entry-points] produces).  Unset
    NF4KIT_BNB_BACKEND registers the CPU kernels only, "1" CPU and CUDA, "0" nothing."""
    dist = tmp_path / "nf4kit_bnb_backend_test-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nf4kit-bnb-backend-test\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[bitsandbytes.backends]\nnf4kit = nf4kit.integrations.bitsandbytes:entry_point\n")
    envv = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "python"),
                                                        os.environ.get("PYTHONPATH", "")]))
    envv.pop("NF4KIT_BNB_BACKEND", None)
    if env is not None:
        envv["NF4KIT_BNB_BACKEND"] = env
    script = _EP_SCRIPT
    if library_mode != "native":                     # torch.library as on the GPU machine, before bitsandbytes
        script = (textwrap.dedent(inspect.getsource(_strict_library_impl)) + "import torch\n"
                  "torch.library.Library.impl = _strict_library_impl(torch.library.Library.impl, "
                  f"{library_mode == 'torch_2_11'})\n" + script)
    out = subprocess.run([sys.executable, "-c", script], env=envv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ENABLED")][-1]
    words = line.split()
    if env == "0":
        assert words[1] == "False" and words[5] == "-"
    else:
        assert words[1] == "True" and int(words[3]) == 1, out.stderr[-2000:]
        assert words[5] == ("cpu,cuda" if env == "1" else "cpu")


@pytest.mark.parametrize("mode", ["torch_2_11", "no_flag"])
def test_entry_point_enables_on_strict_torch(tmp_path, mode):
    """The GPU machine's "ENABLED False": on a torch whose Library.impl refuses overrides by
    default, the entry point's enable() collided with bitsandbytes' Python-registered kernels
    (its CPU ones here; CUDA ones there) and only warned.  It registers now."""
    if mode == "torch_2_11" and not _TORCH_HAS_OVERRIDE_FLAG:
        pytest.skip("this torch has no allow_override flag")
    test_entry_point_discovered_by_bitsandbytes(tmp_path, "1", library_mode=mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and a CUDA build of bitsandbytes")
def test_cuda_same_with_and_without():
    torch.manual_seed(6)
    W = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    p0, s0 = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    d0 = BF.dequantize_4bit(p0, s0)
    with nbnb.enabled():
        p1, _ = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        d1 = BF.dequantize_4bit(p0, s0)
        y1 = bnb.matmul_4bit(x, p0.t(), s0)
    assert torch.equal(d0, d1)
    assert (p0 != p1).float().mean() < 1e-3      # CUDA bnb uses a fast-math reciprocal
    assert rel(y1, x.double() @ d0.double().t()) < 1e-2
    assert nbnb.call_counts[("gemm_4bit", "cuda")] >= 1
