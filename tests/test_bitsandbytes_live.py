"""Against live bitsandbytes 0.50.2 (its CPU path) on fresh random inputs: packed bytes,
absmax, offset, nested codes, dequantized values, and state dicts crossing both ways."""
from __future__ import annotations

import pytest
import torch

import nf4kit
from nf4kit import format as fmt
from conftest import slow_backend

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (33, 77), (1, 4099), (300, 64), (7, 5)]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(dtype)


BNB_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def bnb_cpu_dequant_is_exact(shape, blocksize: int) -> bool:
    """bitsandbytes 0.50.2's AVX-512 C++ CPU dequantize_4bit (used for an even last dim)
    indexes absmax per row, so it is wrong when blocks span rows (last dim not a multiple of
    blocksize); its AVX2 kernel and its generic path (odd last dim) are right."""
    return not BNB_AVX512 or shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def test_bitsandbytes_cpu_dequant_defect_is_real():
    """Documents the defect above: our output follows the format; theirs does exactly where
    bnb_cpu_dequant_is_exact says so."""
    A = _rand((40, 96), torch.float32, seed=2)
    qb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = nf4kit.dequantize_4bit(qb, nf4kit.QuantState.from_dict(sb.as_dict(packed=True)))
    ref = nf4kit.reference.dequantize_4bit(qb.reshape(-1), sb.absmax, None, None, None, 64, "nf4", A.numel(),
                                           torch.float32).view(A.shape)
    assert torch.equal(ours, ref)
    assert torch.equal(F.dequantize_4bit(qb, sb), ref) == bnb_cpu_dequant_is_exact(A.shape, 64)


def _assert_same_codes(ours: torch.Tensor, theirs: torch.Tensor, A: torch.Tensor, blocksize: int) -> None:
    """Packed bytes equal, except where bitsandbytes' CPU path normalises the tail block by
    division (x / absmax) and the format's reciprocal multiply (x * (1 / absmax), as its CUDA
    kernel does) lands on the other side of a threshold: allowed only in the tail block,
    only where the two normalisations differ."""
    bad = (ours != theirs).reshape(-1).nonzero().flatten()
    if bad.numel() == 0:
        return
    x = A.reshape(-1).float()
    n = x.numel()
    tail_start = (n // blocksize) * blocksize
    assert tail_start < n, "codes differ outside a tail block"
    am = x[tail_start:].abs().max()
    for byte in bad.tolist():
        elems = [e for e in (2 * byte, 2 * byte + 1) if e < n]
        assert all(e >= tail_start for e in elems), f"byte {byte} differs outside the tail block"
        assert any((x[e] / am).item() != (x[e] * (1.0 / am)).item() for e in elems), f"byte {byte} differs"
    assert bad.numel() <= 2


@pytest.mark.parametrize("blocksize", fmt.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_plain_state_matches_bitsandbytes(blocksize, quant_type, backend_device):
    backend, device = backend_device
    # the Triton interpreter runs each program in Python: fewer, smaller cases there
    shapes = SHAPES[1:3] if slow_backend(backend, device) else SHAPES
    for i, shape in enumerate(shapes):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            A = _rand(shape, dtype, seed=blocksize * 7 + i)
            qb, sb = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
            qn, sn = nf4kit.quantize_4bit(A.to(device), blocksize=blocksize, compress_statistics=False,
                                          quant_type=quant_type)
            _assert_same_codes(qn.cpu(), qb, A, blocksize)
            assert torch.equal(sn.absmax.cpu(), sb.absmax), (shape, dtype)
            if bnb_cpu_dequant_is_exact(shape, blocksize):  # their state through our dequantize
                theirs_here = nf4kit.QuantState.from_dict(sb.as_dict(packed=True), device=device)
                assert torch.equal(nf4kit.dequantize_4bit(qb.to(device), theirs_here).cpu(),
                                   F.dequantize_4bit(qb, sb))


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_nested_state_matches_bitsandbytes(blocksize, backend_device):
    backend, device = backend_device
    A = _rand((131, 129) if slow_backend(backend, device) else (515, 129), torch.float32, seed=blocksize)
    qb, sb = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    qn, sn = nf4kit.quantize_4bit(A.to(device), blocksize=blocksize, compress_statistics=True)
    assert torch.equal(qn.cpu(), qb)
    # offset: bitsandbytes takes torch's fp32 mean (its order depends on the CPU's vector
    # width); nf4kit defines it as fp32(fp64 mean) so that every backend agrees.
    assert sn.offset.item() == pytest.approx(sb.offset.item(), rel=1e-6)
    assert torch.allclose(sn.state2.absmax.cpu(), sb.state2.absmax, rtol=1e-6, atol=0)
    assert torch.equal(sn.state2.code.cpu(), sb.state2.code)
    # Given bitsandbytes' offset, the nested absmax is bit-identical.
    _, plain = nf4kit.quantize_4bit(A.to(device), blocksize=blocksize, compress_statistics=False)
    q8, nested = nf4kit.ops.quantize_blockwise(plain.absmax - sb.offset.to(device), sn.state2.code, 256)
    assert torch.equal(nested.cpu(), sb.state2.absmax)
    sn.absmax = q8
    # bitsandbytes' CPU nested codes come from a 65536-bin lookup table, ours are the exact
    # nearest: they may differ by one code, rarely.
    diff = (sn.absmax.cpu().int() - sb.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
    # with bitsandbytes' own nested codes, our dequantize reproduces theirs exactly
    sb_on_dev = nf4kit.QuantState.from_dict(sb.as_dict(packed=True), device=device)
    assert torch.equal(nf4kit.dequantize_4bit(qb.to(device), sb_on_dev).cpu(), F.dequantize_4bit(qb, sb))


def test_exact_nested_codes_are_nearest():
    """Where bitsandbytes' LUT and our codes differ, ours is at least as close."""
    A = _rand((1024, 257), torch.float32, seed=3)
    qb, sb = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, sn = nf4kit.quantize_4bit(A, blocksize=64, compress_statistics=True)
    _, plain = nf4kit.quantize_4bit(A, blocksize=64, compress_statistics=False)
    code = sn.state2.code
    scale = sn.state2.absmax.repeat_interleave(256)[: plain.absmax.numel()]
    target = (plain.absmax - sn.offset) / scale
    ours = (code[sn.absmax.long()] - target).abs()
    theirs = (code[sb.absmax.long()] - target).abs()
    assert (ours <= theirs + 1e-7).all()


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_same_bytes(storage):
    A = _rand((64, 128), torch.float32, seed=11)
    qb, sb = F.quantize_4bit(A, blocksize=64, quant_storage=storage, quant_type="nf4", compress_statistics=False)
    qn, sn = nf4kit.quantize_4bit(A, blocksize=64, quant_storage=storage, compress_statistics=False)
    assert qn.dtype == storage and qn.shape == qb.shape
    assert torch.equal(qn.view(torch.uint8), qb.view(torch.uint8))
    assert torch.equal(nf4kit.dequantize_4bit(qn, sn), F.dequantize_4bit(qb, sb))


def test_state_dicts_cross_both_ways():
    torch.manual_seed(5)
    lin = torch.nn.Linear(128, 40)
    x = torch.randn(4, 128)
    # theirs -> ours
    q = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    sd = q.state_dict()
    qs = nf4kit.QuantState.from_dict({k[7:]: v for k, v in sd.items() if k.startswith("weight.")})
    W = nf4kit.dequantize_4bit(sd["weight"], qs)
    assert torch.equal(W, F.dequantize_4bit(q.weight.data, q.weight.quant_state))
    torch.testing.assert_close(torch.nn.functional.linear(x, W, sd["bias"]), q(x), rtol=1e-5, atol=1e-5)
    # ours -> theirs
    packed, qs = nf4kit.quantize_4bit(lin.weight.data, blocksize=64, compress_statistics=True)
    ours_sd = {"weight": packed, "bias": lin.bias.data}
    ours_sd.update({f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    p2 = bnb.nn.Params4bit.from_prequantized(ours_sd["weight"], {k[7:]: v for k, v in ours_sd.items()
                                                                   if k.startswith("weight.")}, device="cpu")
    assert torch.equal(F.dequantize_4bit(p2.data, p2.quant_state), nf4kit.dequantize_4bit(packed, qs))
