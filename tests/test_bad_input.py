"""Bad input gets a clear ValueError / TypeError naming the problem, before any kernel runs."""
from __future__ import annotations

import json

import pytest
import torch

import nf4kit
from nf4kit import format as fmt


@pytest.fixture
def state():
    A = torch.randn(48, 80)
    packed, qs = nf4kit.quantize_4bit(A, blocksize=64, compress_statistics=True)
    return packed, qs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fn", ["quantize_4bit", "quantize_blockwise", "quantize_absmax_int8"])
def test_non_finite_input(bad, fn):
    A = torch.randn(16, 16)
    A[3, 5] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        getattr(nf4kit, fn)(A)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4kit.quantize_4bit(torch.ones(8, 8).to(dtype))


@pytest.mark.parametrize("bs", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_blocksize_outside_set(bs):
    with pytest.raises(ValueError, match="blocksize"):
        nf4kit.quantize_4bit(torch.randn(8, 8), blocksize=bs)


def test_bad_quant_type_and_storage():
    with pytest.raises(ValueError, match="quant_type"):
        nf4kit.quantize_4bit(torch.randn(8, 8), quant_type="int4")
    with pytest.raises(TypeError, match="quant_storage"):
        nf4kit.quantize_4bit(torch.randn(8, 8), quant_storage=torch.int64)
    with pytest.raises(ValueError, match="whole"):
        nf4kit.quantize_4bit(torch.randn(3, 3), quant_storage=torch.float32)  # 5 bytes


def test_empty_tensor():
    with pytest.raises(ValueError, match="empty"):
        nf4kit.quantize_4bit(torch.empty(0, 4))


def test_absmax_length_mismatch(state):
    packed, qs = state
    qs.absmax = qs.absmax[:-1]
    with pytest.raises(ValueError, match="absmax has"):
        nf4kit.dequantize_4bit(packed, qs)


def test_shape_does_not_match_packed(state):
    packed, qs = state
    qs.shape = torch.Size([48, 82])
    with pytest.raises(ValueError, match="bytes|absmax"):
        nf4kit.dequantize_4bit(packed, qs)
    _, qs2 = nf4kit.quantize_4bit(torch.randn(48, 80), compress_statistics=False)
    with pytest.raises(ValueError, match="packed weight holds"):
        nf4kit.dequantize_4bit(packed[:-1], qs2)


def test_nested_sizes_mismatch(state):
    packed, qs = state
    qs.state2.absmax = torch.cat([qs.state2.absmax, qs.state2.absmax])
    with pytest.raises(ValueError, match="nested_absmax"):
        nf4kit.dequantize_4bit(packed, qs)
    _, qs = nf4kit.quantize_4bit(torch.randn(48, 80))
    qs.state2.code = qs.state2.code[:100]
    with pytest.raises(ValueError, match="nested_quant_map"):
        nf4kit.dequantize_4bit(packed, qs)
    _, qs = nf4kit.quantize_4bit(torch.randn(48, 80))
    qs.state2.blocksize = 128
    with pytest.raises(ValueError, match="nested_blocksize"):
        nf4kit.dequantize_4bit(packed, qs)


def test_wrong_absmax_dtypes(state):
    packed, qs = state
    qs.absmax = qs.absmax.float()
    with pytest.raises(TypeError, match="uint8"):
        nf4kit.dequantize_4bit(packed, qs)
    _, qs = nf4kit.quantize_4bit(torch.randn(48, 80), compress_statistics=False)
    qs.absmax = qs.absmax.half()
    with pytest.raises(TypeError, match="float32"):
        nf4kit.dequantize_4bit(packed, qs)


def _packed_dict(qs):
    return {f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[: len(b) // 2], "malformed or truncated"),
    (lambda b: b"not json at all", "malformed or truncated"),
    (lambda b: b"[1, 2, 3]", "must be an object"),
    (lambda b: b"\xff\xfe" + b, "malformed or truncated"),
])
def test_malformed_or_truncated_json(state, mutate, match):
    _, qs = state
    d = _packed_dict(qs)
    raw = bytes(d["weight.quant_state.bitsandbytes__nf4"].tolist())
    d["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(mutate(raw)), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        nf4kit.QuantState.from_dict(d)


@pytest.mark.parametrize("field,value,match", [
    ("blocksize", 65, "blocksize"),
    ("blocksize", "64", "blocksize"),
    ("dtype", "float64", "dtype"),
    ("shape", [48, -80], "shape"),
    ("shape", "48x80", "shape"),
    ("quant_type", "fp8", "quant_type"),
    ("nested_offset", "abc", "nested_offset"),
    ("nested_offset", float("nan"), "not finite"),
    ("nested_blocksize", 128, "nested_blocksize"),
])
def test_malformed_json_fields(state, field, value, match):
    _, qs = state
    d = _packed_dict(qs)
    meta = json.loads(bytes(d["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta[field] = value
    d["weight.quant_state.bitsandbytes__nf4"] = fmt.pack_json(meta)
    with pytest.raises(ValueError, match=match):
        nf4kit.QuantState.from_dict(d)


def test_missing_and_unknown_entries(state):
    _, qs = state
    d = _packed_dict(qs)
    with pytest.raises(ValueError, match="missing"):
        nf4kit.QuantState.from_dict({k: v for k, v in d.items() if not k.endswith(".absmax")})
    with pytest.raises(ValueError, match="incomplete double-quant"):
        nf4kit.QuantState.from_dict({k: v for k, v in d.items() if not k.endswith("nested_absmax")})
    with pytest.raises(ValueError, match="unknown"):
        nf4kit.QuantState.from_dict({**d, "weight.surprise": torch.zeros(1)})
    with pytest.raises(ValueError, match="found neither"):
        nf4kit.QuantState.from_dict({"weight.absmax": torch.zeros(1)})
    two = dict(d)
    two["weight.quant_state.bitsandbytes__fp4"] = d["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="exactly one"):
        nf4kit.QuantState.from_dict(two)


def test_corrupt_values_rejected_on_load(state):
    _, qs = state
    d = _packed_dict(qs)
    d["weight.quant_map"] = d["weight.quant_map"].flip(0)
    with pytest.raises(ValueError, match="quant_map"):
        nf4kit.QuantState.from_dict(d)
    d = _packed_dict(qs)
    d["weight.nested_absmax"] = torch.full_like(d["weight.nested_absmax"], float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4kit.QuantState.from_dict(d)


def test_matmul_bad_shapes(state):
    packed, qs = state
    x = torch.randn(3, 80)
    with pytest.raises(ValueError, match="in_features=80"):
        nf4kit.matmul_4bit(torch.randn(3, 81), packed, qs)
    with pytest.raises(ValueError, match="bias"):
        nf4kit.matmul_4bit(x, packed, qs, bias=torch.randn(47))
    with pytest.raises(ValueError, match="together"):
        nf4kit.matmul_4bit(x, packed, qs, lora_A=torch.randn(4, 80))
    with pytest.raises(ValueError, match="lora_A"):
        nf4kit.matmul_4bit(x, packed, qs, lora_A=torch.randn(4, 81), lora_B=torch.randn(48, 4))
    with pytest.raises(ValueError, match="lora_B"):
        nf4kit.matmul_4bit(x, packed, qs, lora_A=torch.randn(4, 80), lora_B=torch.randn(48, 5))
    with pytest.raises(TypeError, match="x must be"):
        nf4kit.matmul_4bit(x.double(), packed, qs)
    with pytest.raises(TypeError, match="QuantState"):
        nf4kit.matmul_4bit(x, packed, {"absmax": qs.absmax})


def test_mismatched_devices(state):
    packed, qs = state
    meta_x = torch.randn(3, 80, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        nf4kit.matmul_4bit(meta_x, packed, qs)
    qs.state2.absmax = qs.state2.absmax.to("meta")
    with pytest.raises(ValueError, match="is on meta"):
        nf4kit.dequantize_4bit(packed, qs)


def test_bad_out_buffer(state):
    packed, qs = state
    with pytest.raises(ValueError, match="contiguous with 3840 elements"):
        nf4kit.dequantize_4bit(packed, qs, out=torch.empty(3839))
    with pytest.raises(ValueError, match="not contiguous"):
        nf4kit.dequantize_4bit(packed, qs, out=torch.empty(80, 48).t())
    with pytest.raises(TypeError, match="out must be float32"):
        nf4kit.dequantize_4bit(packed, qs, out=torch.empty(3840, dtype=torch.float64))
    with pytest.raises(TypeError, match="match dtype"):
        nf4kit.dequantize_4bit(packed, qs, dtype=torch.float16, out=torch.empty(3840))
    with pytest.raises(ValueError, match="different devices"):
        nf4kit.dequantize_4bit(packed, qs, out=torch.empty(3840, device="meta"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown nf4kit backend"):
        nf4kit.use_backend("tpu")


def test_env_backend_unknown(monkeypatch):
    monkeypatch.setenv("NF4KIT_BACKEND", "nope")
    with pytest.raises(ValueError, match="NF4KIT_BACKEND"):
        nf4kit.dequantize_4bit(*nf4kit.quantize_4bit(torch.randn(4, 4), compress_statistics=False))


def test_absmax_must_be_flat(state):
    """absmax of the right size but 2-D passed validation, and the backends disagreed (cpu and
    triton indexed it flat, torch broadcast it): every call now refuses it."""
    packed, qs = state
    for shape in ((qs.absmax.numel() // 2, 2), (qs.absmax.numel(), 1)):
        bad = qs.clone()
        bad.absmax = bad.absmax.reshape(shape)
        with pytest.raises(ValueError, match="absmax must be 1-D"):
            nf4kit.dequantize_4bit(packed, bad)
    bad = qs.clone()
    bad.state2.absmax = bad.state2.absmax.reshape(1, -1)
    with pytest.raises(ValueError, match="nested_absmax must be a 1-D"):
        nf4kit.dequantize_4bit(packed, bad)


def test_state_fields_of_the_wrong_kind(state):
    packed, qs = state
    bad = qs.clone()
    bad.shape = (-48, -80)  # a positive product: it reached the kernel and failed in .view
    with pytest.raises(ValueError, match="non-negative"):
        nf4kit.dequantize_4bit(packed, bad)
    bad = qs.clone()
    bad.offset = 0.5
    with pytest.raises(ValueError, match="offset"):
        nf4kit.dequantize_4bit(packed, bad)
    with pytest.raises(TypeError, match="dict"):
        fmt.QuantState.from_dict(None)


@pytest.mark.parametrize("scale,err", [(None, TypeError), ("2.0", TypeError), (1j, TypeError), (True, TypeError),
                                       (float("nan"), ValueError), (1e300, ValueError)])
def test_lora_scale_kind(state, scale, err):
    packed, qs = state
    x, A, B = torch.randn(2, 80), torch.randn(4, 80), torch.randn(48, 4)
    with pytest.raises(err, match="lora_scale"):
        nf4kit.matmul_4bit(x, packed, qs, lora_A=A, lora_B=B, lora_scale=scale)


def test_8bit_and_int8_codes_in_their_layout():
    """dequantize_blockwise / dequantize_absmax_int8 of transposed codes assigned them to the wrong
    blocks (errors of 128 and 326 against the input): they are refused like non-contiguous 4-bit
    data; dequantize_absmax_int8 checks its blocksize and scale as quantize does."""
    x = torch.randn(300, 4)
    x[:, 0] *= 100
    q, qs = nf4kit.quantize_blockwise(x)
    with pytest.raises(ValueError, match="contiguous"):
        nf4kit.dequantize_blockwise(q.t(), qs)
    assert torch.equal(nf4kit.dequantize_blockwise(q.t().contiguous().t().contiguous(), qs),
                       nf4kit.dequantize_blockwise(q, qs))
    with pytest.raises(TypeError, match="code"):
        nf4kit.quantize_blockwise(x, code=[0.0] * 256)
    qi, s = nf4kit.quantize_absmax_int8(x, blocksize=4)
    with pytest.raises(ValueError, match="contiguous"):
        nf4kit.dequantize_absmax_int8(qi.t(), s, blocksize=4)
    qt, st = nf4kit.quantize_absmax_int8(x)  # one scale: any layout is the same tensor
    assert torch.equal(nf4kit.dequantize_absmax_int8(qt.t(), st), nf4kit.dequantize_absmax_int8(qt, st).t())
    for bs in (0, -1, 4.0, True):
        with pytest.raises(ValueError, match="blocksize"):
            nf4kit.dequantize_absmax_int8(qi, s, blocksize=bs)
    with pytest.raises(TypeError, match="scale"):
        nf4kit.dequantize_absmax_int8(qi, 1.0, blocksize=4)


@pytest.mark.parametrize("fn", ["quantize_4bit", "quantize_blockwise", "quantize_absmax_int8"])
def test_quantize_a_meta_tensor(fn):
    """A meta tensor has no values: a ValueError naming the meta device, not torch's .item() error."""
    with pytest.raises(ValueError, match="meta device"):
        getattr(nf4kit, fn)(torch.empty(4, 64, device="meta"))
