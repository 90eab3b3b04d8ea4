"""reference.py itself: the oracle's matmuls against float64 arithmetic, int8 absmax, and
blockwise 8-bit quantization (every backend serving these ops is compared here too)."""
from __future__ import annotations

import pytest
import torch

import nf4kit
from nf4kit import ops
from conftest import assert_ran, slow_backend

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,bs", [(1, 33, 48, 64), (5, 17, 96, 32), (16, 64, 130, 128), (3, 7, 9, 4096)])
@pytest.mark.parametrize("nested", [False, True])
def test_matmul_4bit_vs_float64(dtype, M, N, K, bs, nested, backend_device):
    backend, device = backend_device
    if slow_backend(backend, device) and (dtype != torch.bfloat16 or nested):
        pytest.skip("interpreter: one dtype/state combination is enough here")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    W = torch.randn(N, K, generator=g)
    packed, qs = nf4kit.quantize_4bit(W.to(device), blocksize=bs, compress_statistics=nested)
    W64 = nf4kit.dequantize_4bit(packed, qs, dtype=torch.float32).double().cpu()
    x = torch.randn(M, K, generator=g).to(dtype)
    A, B = torch.randn(4, K, generator=g) * 0.1, torch.randn(N, 4, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    s = 0.75
    y = nf4kit.matmul_4bit(x.to(device), packed, qs, bias.to(dtype).to(device), A.to(dtype).to(device),
                           B.to(dtype).to(device), s)
    assert_ran("matmul_4bit", backend)
    assert y.dtype == dtype and y.shape == (M, N)
    x64, A64, B64 = x.double(), A.to(dtype).double(), B.to(dtype).double()
    ref = x64 @ W64.t() + s * (x64 @ A64.t()) @ B64.t() + bias.to(dtype).double()
    assert rel_err(y.cpu(), ref) < TOL[dtype]
    dy = torch.randn(M, N, generator=g).to(dtype)
    dx = ops.matmul_4bit_backward_input(dy.to(device), packed.reshape(-1).view(torch.uint8), *ops.state_args(qs),
                                        bs, "nf4", N, K, A.to(dtype).to(device), B.to(dtype).to(device), s)
    assert_ran("matmul_4bit_backward_input", backend)
    dy64 = dy.double()
    ref_dx = dy64 @ W64 + s * (dy64 @ B64) @ A64
    assert dx.dtype == dtype and rel_err(dx.cpu(), ref_dx) < TOL[dtype]


@pytest.mark.parametrize("blocksize", [None, 64, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_absmax_int8_textbook(blocksize, dtype, backend_device):
    backend, device = backend_device
    X = (torch.randn(37, 29) * 5).to(dtype).to(device)
    q, scale = nf4kit.quantize_absmax_int8(X, blocksize=blocksize)
    assert q.dtype == torch.int8 and q.shape == X.shape
    x = X.float().reshape(-1).cpu()
    bs = x.numel() if blocksize is None else blocksize
    for b in range(0, x.numel(), bs):
        blk = x[b:b + bs]
        c = 127.0 / blk.abs().max()
        assert torch.equal(q.reshape(-1)[b:b + bs].cpu(), torch.round(blk * c).to(torch.int8))
        assert q.reshape(-1)[b:b + bs].abs().max() == 127
    X2 = nf4kit.dequantize_absmax_int8(q, scale, blocksize=blocksize, dtype=torch.float32)
    err = (X2.cpu() - X.float().cpu()).abs()
    per = scale.reshape(-1).cpu().repeat_interleave(bs)[: x.numel()].view(X.shape) / 127
    assert (err <= per / 2 + 1e-6).all()  # half a quantization step


def test_absmax_int8_zero_block():
    X = torch.zeros(4, 8)
    X[0, 0] = 3.0
    q, scale = nf4kit.quantize_absmax_int8(X, blocksize=8)
    assert torch.equal(q[1:], torch.zeros_like(q[1:])) and q[0, 0] == 127
    assert torch.equal(nf4kit.dequantize_absmax_int8(q, scale, blocksize=8), X)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_8bit_roundtrip(blocksize, backend_device):
    backend, device = backend_device
    A = torch.randn(3000, device=device) * 2
    q, qs = nf4kit.quantize_blockwise(A, blocksize=blocksize)
    assert_ran("quantize_blockwise", backend)
    with nf4kit.use_backend("torch"):
        q_ref, qs_ref = nf4kit.quantize_blockwise(A.cpu(), blocksize=blocksize)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(qs.absmax.cpu(), qs_ref.absmax)
    out = nf4kit.dequantize_blockwise(q, qs)
    assert_ran("dequantize_blockwise", backend)
    with nf4kit.use_backend("torch"):
        assert torch.equal(out.cpu(), nf4kit.dequantize_blockwise(q_ref, qs_ref))
    # nearest entry of the map: error at most half the largest gap, times absmax
    assert ((out.cpu() - A.cpu()).abs() <= 0.5 * qs.code.diff().max().cpu() * A.abs().max().cpu() + 1e-6).all()
