"""Bit-exactness against the bitsandbytes 0.50.2 golden vectors, on every backend.

Nested (double-quant) 8-bit codes are compared with the exact-nearest emulation of
bitsandbytes' CUDA kernel (its CPU path uses an approximate lookup table, see
tests/data/GOLDEN_README.md)."""
from __future__ import annotations

import pytest
import torch

import nf4kit
from conftest import assert_ran

CASES = ["w64x128_nf4_bs64", "w64x128_nf4_bs64_dq", "w300x64_nf4_bs64_dq_2nested", "tail_3x50_nf4_bs64",
         "tail_3x50_nf4_bs64_dq", "odd_5x15_nf4_bs64", "zero_block_2x64_nf4_bs64", "ties_1x64_nf4_bs64",
         "bf16_32x128_nf4_bs64_dq", "fp16_32x128_nf4_bs64", "w64x128_nf4_bs32", "w64x128_nf4_bs128",
         "w64x128_nf4_bs4096", "w64x128_fp4_bs64"]


@pytest.mark.parametrize("case", CASES)
def test_golden_quantize_dequantize(case, golden, backend_device):
    backend, device = backend_device
    rec = golden[case]
    A = rec["input"].to(device)
    packed, qs = nf4kit.quantize_4bit(A, blocksize=rec["blocksize"], compress_statistics=rec["compress_statistics"],
                                      quant_type=rec["quant_type"])
    assert_ran("quantize_4bit", backend)
    assert packed.shape == rec["packed"].shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), rec["packed"])
    if rec["compress_statistics"]:
        assert_ran("quantize_blockwise", backend)
        assert torch.equal(qs.absmax.cpu(), rec["cuda_emulated_absmax_u8"])
        assert torch.equal(qs.state2.absmax.cpu(), rec["nested_absmax"])
        assert qs.offset.item() == pytest.approx(rec["offset"], rel=1e-6)
    else:
        assert torch.equal(qs.absmax.cpu(), rec["absmax"])
    out = nf4kit.dequantize_4bit(packed, qs)
    assert_ran("dequantize_4bit", backend)
    expected = rec.get("cuda_emulated_dequant", rec["dequant"])
    assert out.dtype == A.dtype and out.shape == A.shape
    assert torch.equal(out.cpu(), expected)
    assert bytes(qs.as_dict(packed=True)[rec["packed_quant_state_key"]].tolist()).decode() == \
        rec["packed_quant_state_json"]


@pytest.mark.parametrize("case", ["w64x128_nf4_bs64_dq", "w300x64_nf4_bs64_dq_2nested", "bf16_32x128_nf4_bs64_dq"])
def test_golden_dequantize_of_bitsandbytes_state(case, golden, backend_device):
    """Dequantizing bitsandbytes' own (CPU-made) nested state reproduces its output exactly."""
    backend, device = backend_device
    rec = golden[case]
    qs = nf4kit.QuantState.from_dict({
        "absmax": rec["absmax_u8"], "quant_map": rec["quant_map"], "nested_absmax": rec["nested_absmax"],
        "nested_quant_map": rec["nested_quant_map"],
        "quant_state.bitsandbytes__nf4": torch.tensor(list(rec["packed_quant_state_json"].encode()),
                                                      dtype=torch.uint8)}, device=device)
    out = nf4kit.dequantize_4bit(rec["packed"].to(device), qs)
    assert_ran("dequantize_4bit", backend)
    assert torch.equal(out.cpu(), rec["dequant"])
