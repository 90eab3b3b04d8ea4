"""Gradients of nf4kit.matmul_4bit (and the layers' autograd paths) against a float64 reference.

y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias with W = deq(packed): every gradient (x, bias, A, B) is compared
with float64 autograd on the same (rounded) inputs by ‖g − ref‖/‖ref‖ (fp32 < 1e-5,
fp16/bf16 < 1e-2); the packed weight never gets a gradient and the dequantized weight is never
saved for backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as cp

import nf4kit
from nf4kit.nn import LoRALinear4bit, Linear4bit

from conftest import slow_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest.one_thread


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_case(N: int, K: int, r: int, qs_dtype: torch.dtype, act_dtype: torch.dtype, lead: tuple, bias: bool,
              lora: bool, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(qs_dtype)
    packed, qs = nf4kit.quantize_4bit(W.to(device), blocksize=64, compress_statistics=True)
    x = (torch.randn(*lead, K, generator=g)).to(act_dtype).to(device).requires_grad_()
    b = (torch.randn(N, generator=g) * 0.5).to(act_dtype).to(device).requires_grad_() if bias else None
    A = B = None
    if lora:
        A = (torch.randn(r, K, generator=g) * 0.2).to(device).requires_grad_()  # fp32 parameters, as PEFT
        B = (torch.randn(N, r, generator=g) * 0.2).to(device).requires_grad_()
    return packed, qs, x, b, A, B


def reference(packed, qs, x, b, A, B, s, act_dtype):
    """float64 forward on the values the op really sees (LoRA/bias rounded to the compute dtype)."""
    Wd = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double()
    leaves = {}

    def leaf(name, t, round_to=None):
        if t is None:
            return None
        v = t.detach()
        if round_to is not None:
            v = v.to(round_to)
        v = v.double().requires_grad_()
        leaves[name] = v
        return v

    xd = leaf("x", x)
    bd = leaf("bias", b, act_dtype)
    Ad = leaf("A", A, act_dtype)
    Bd = leaf("B", B, act_dtype)
    y = xd @ Wd.t()
    if Ad is not None:
        y = y + s * (xd @ Ad.t()) @ Bd.t()
    if bd is not None:
        y = y + bd
    return y, leaves


@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qs_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias,lora", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["bias+lora", "lora", "bias", "plain"])
def test_grads_vs_float64(act_dtype, qs_dtype, lead, bias, lora):
    N, K, r, s = 40, 96, 4, 1.7
    packed, qs, x, b, A, B = make_case(N, K, r, qs_dtype, act_dtype, lead, bias, lora)
    y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=s)
    assert y.dtype == act_dtype and y.shape == (*lead, N)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(act_dtype)
    y.backward(dy)
    yr, leaves = reference(packed, qs, x, b, A, B, s, act_dtype)
    yr.backward(dy.double())
    tol = TOL[act_dtype]
    assert rel(y, yr) < tol
    assert x.grad is not None and x.grad.dtype == act_dtype
    assert rel(x.grad, leaves["x"].grad) < tol
    if bias:
        assert b.grad.dtype == b.dtype and rel(b.grad, leaves["bias"].grad) < tol
    if lora:
        assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
        assert rel(A.grad, leaves["A"].grad) < tol
        assert rel(B.grad, leaves["B"].grad) < tol
    assert not packed.requires_grad and packed.grad is None


def test_grads_each_backend(backend_device):
    """The fused forward/backward ops of every usable backend give the same gradients."""
    b_name, dev = backend_device
    small = slow_backend(b_name, dev)
    N, K, r, s = (24, 64, 2, 0.9) if small else (72, 160, 8, 0.9)
    for act in (torch.float32, torch.bfloat16):
        packed, qs, x, b, A, B = make_case(N, K, r, torch.float32, act, (3, 5), True, True, device=dev)
        y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=s)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(act).to(dev)
        y.backward(dy)
        yr, leaves = reference(packed.cpu(), qs.clone().to("cpu"), x.cpu(), b.cpu(), A.cpu(), B.cpu(), s, act)
        yr.backward(dy.double().cpu())
        tol = TOL[act]
        assert rel(y.cpu(), yr) < tol
        for name, t in (("x", x), ("bias", b), ("A", A), ("B", B)):
            assert rel(t.grad.cpu(), leaves[name].grad) < tol, name


def test_only_requested_grads():
    packed, qs, x, b, A, B = make_case(16, 64, 2, torch.float32, torch.float32, (4,), True, True)
    x.requires_grad_(False)
    b.requires_grad_(False)
    B.requires_grad_(False)
    y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=2.0)
    y.sum().backward()
    assert A.grad is not None and x.grad is None and b.grad is None and B.grad is None


def test_no_grad_inputs_no_graph():
    packed, qs, x, b, A, B = make_case(16, 64, 2, torch.float32, torch.float32, (4,), True, True)
    with torch.no_grad():
        y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B)
    assert not y.requires_grad


class _SavedBytes:
    """Counts what autograd saves for backward (bytes, and the largest float tensor)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.largest_float = 0
        self.shapes: list = []

    def pack(self, t: torch.Tensor):
        self.nbytes += t.numel() * t.element_size()
        if t.is_floating_point():
            self.largest_float = max(self.largest_float, t.numel())
        self.shapes.append((tuple(t.shape), t.dtype))
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("lora", [False, True])
def test_backward_never_saves_dequantized_weight(lora):
    N, K, M, r = 256, 512, 4, 4
    packed, qs, x, b, A, B = make_case(N, K, r, torch.float32, torch.float32, (M,), True, lora)
    with _SavedBytes() as saved:
        y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=2.0)
    assert saved.largest_float < N * K, saved.shapes  # no [N, K] float tensor
    state_bytes = packed.numel() + sum(t.numel() * t.element_size() for t in nf4kit.ops.state_args(qs)
                                       if t is not None)
    lora_bytes = 0 if not lora else (x.numel() + A.numel() + B.numel()) * 4
    assert saved.nbytes <= state_bytes + lora_bytes, saved.shapes
    if not lora:
        assert all(shape != tuple(x.shape) for shape, _ in saved.shapes), "x saved on the frozen path"
    y.sum().backward()
    assert x.grad is not None


def test_layer_backward_memory_is_small():
    """A LoRA layer saves far less than its fp32 weight (QLoRA's point)."""
    lin = torch.nn.Linear(512, 384, bias=False)
    layer = LoRALinear4bit.from_linear(lin, r=8, compute_dtype=torch.float32)
    x = torch.randn(2, 3, 512, requires_grad=True)
    with _SavedBytes() as saved:
        y = layer(x)
    assert saved.largest_float < 512 * 384
    assert saved.nbytes < 512 * 384 * 4 // 4  # under a quarter of the fp32 weight
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def _lora_layer(dropout: float = 0.0, compute_dtype=torch.float32, seed: int = 0) -> LoRALinear4bit:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(96, 48, bias=True)
    layer = LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8, lora_dropout=dropout, compute_dtype=compute_dtype)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)  # B = 0 would hide LoRA bugs
    return layer


def _layer_grads(layer, x):
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    return [x.grad.clone(), A.grad.clone(), B.grad.clone()]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint(use_reentrant):
    layer = _lora_layer()
    blk = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(3, 5, 96, requires_grad=True)
    blk(x).square().sum().backward()
    ref = _layer_grads(layer, x)
    x.grad = None
    layer.zero_grad()
    out = cp.checkpoint(blk, x, use_reentrant=use_reentrant)
    out.square().sum().backward()
    got = _layer_grads(layer, x)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-6


def test_autocast_cpu_bf16():
    layer = _lora_layer(compute_dtype=None)
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        # under autocast the layer computes and returns bf16, as nn.Linear does
        assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, dtype=torch.bfloat16)
    y.backward(dy)
    base = layer.base_layer
    W = base.dequantize(torch.float32).double()
    xd = x.detach().to(torch.bfloat16).double().requires_grad_()
    Ad = layer.lora_A["default"].weight.detach().to(torch.bfloat16).double().requires_grad_()
    Bd = layer.lora_B["default"].weight.detach().to(torch.bfloat16).double().requires_grad_()
    bd = base.bias.detach().to(torch.bfloat16).double()
    yr = xd @ W.t() + bd + layer.scaling["default"] * (xd @ Ad.t()) @ Bd.t()
    yr.backward(dy.double())
    assert rel(y, yr) < 1e-2
    assert x.grad.dtype == torch.float32
    for g, r in zip(_layer_grads(layer, x), (xd.grad, Ad.grad, Bd.grad)):
        assert rel(g, r) < 1e-2


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_dropout_grads(act_dtype):
    p = 0.4
    layer = _lora_layer(dropout=p, compute_dtype=act_dtype)
    layer.train()
    x = torch.randn(2, 6, 96).to(act_dtype).requires_grad_()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    mask = torch.nn.functional.dropout(torch.ones(x.shape, dtype=act_dtype), p=p, training=True)
    dy = torch.randn(y.shape).to(act_dtype)
    y.backward(dy)
    base = layer.base_layer
    W = base.dequantize(torch.float32).double()
    xd = x.detach().double().requires_grad_()
    Ad = layer.lora_A["default"].weight.detach().to(act_dtype).double().requires_grad_()
    Bd = layer.lora_B["default"].weight.detach().to(act_dtype).double().requires_grad_()
    bd = base.bias.detach().to(act_dtype).double()
    s = layer.scaling["default"]
    yr = xd @ W.t() + bd + s * ((xd * mask.double()) @ Ad.t()) @ Bd.t()
    yr.backward(dy.double())
    tol = TOL[act_dtype]
    assert rel(y, yr) < tol
    for g, r in zip(_layer_grads(layer, x), (xd.grad, Ad.grad, Bd.grad)):
        assert rel(g, r) < tol
    # the mask really dropped something, and only on the LoRA branch: eval mode is deterministic
    assert (mask == 0).any()
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_w_has_no_grad_in_layers():
    layer = _lora_layer()
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert layer.base_layer.bias.grad is None  # the base is frozen under LoRA
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}


def test_plain_linear4bit_bias_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()
    assert rel(layer.bias.grad, torch.full((32,), 5.0)) < 1e-6
    W = layer.dequantize(torch.float32)
    assert rel(x.grad, W.sum(0).expand(5, 64)) < 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_opcheck_with_autograd(lora):
    """torch.library.opcheck exercises the registered autograd formula (incl. aot_dispatch)."""
    packed, qs, x, b, A, B = make_case(24, 64, 2, torch.float32, torch.float32, (5,), True, lora)
    args = (x, packed.reshape(-1), *nf4kit.ops.state_args(qs), qs.blocksize, qs.quant_type, 24, 64, b, A, B, 1.5)
    torch.library.opcheck(torch.ops.nf4kit.matmul_4bit.default, args)


def test_inference_calls_skip_the_dispatcher_but_not_autograd_or_autocast(monkeypatch):
    """Without autograd, autocast or tracing, matmul_4bit calls the backend directly (same bits
    as the custom op); with any of them it goes through nf4kit::matmul_4bit."""
    from nf4kit import ops

    calls = []
    real = ops.matmul_4bit

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "matmul_4bit", spy)
    packed, qs, x, b, A, B = make_case(72, 128, 4, torch.float32, torch.bfloat16, (3,), True, True, seed=7)
    x0, b0, A0, B0 = (t.detach() for t in (x, b, A, B))
    direct = nf4kit.matmul_4bit(x0, packed, qs, bias=b0, lora_A=A0, lora_B=B0, lora_scale=0.5)
    assert calls == []
    via_op = real(x0, packed.reshape(-1), *ops.state_args(qs), 64, "nf4", 72, 128, b0.to(torch.bfloat16),
                  A0.to(torch.bfloat16), B0.to(torch.bfloat16), 0.5)
    assert torch.equal(direct, via_op)
    y = nf4kit.matmul_4bit(x, packed, qs, bias=b, lora_A=A, lora_B=B, lora_scale=0.5)  # needs grad
    assert calls == [1] and y.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nf4kit.matmul_4bit(x0.float(), packed, qs)
    assert calls == [1, 1]


def test_vmap_over_matmul_gives_the_loops_bits(backend_device):
    """torch.func.vmap over matmul_4bit (with bias and LoRA): the batched wrappers have no storage,
    which the native backends read directly ("Cannot access data pointer"); under a transform the
    call goes through the op, whose batching fallback runs each sample, the bits of a loop."""
    b, dev = backend_device
    N, K = 24, 80
    packed, qs = nf4kit.quantize_4bit(torch.randn(N, K, device=dev), blocksize=64)
    bias, A, B = torch.randn(N, device=dev), torch.randn(4, K, device=dev), torch.randn(N, 4, device=dev)
    xs = torch.randn(3, 2, K, device=dev)
    with torch.no_grad():
        y = torch.func.vmap(lambda x: nf4kit.matmul_4bit(x, packed, qs, bias, A, B, 0.5))(xs)
        ref = torch.stack([nf4kit.matmul_4bit(x, packed, qs, bias, A, B, 0.5) for x in xs])
    assert torch.equal(y, ref)
    assert nf4kit.backends.last_backend["matmul_4bit"] == b
