"""format.py: tables and the dynamic map against bitsandbytes and csrc/core, QuantState
serialisation (bitsandbytes' keys and JSON, byte for byte), and validation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import nf4kit
from nf4kit import format as fmt

ROOT = Path(__file__).resolve().parents[1]


def _core_literals(name: str) -> list[float]:
    """The hex float literals of a table macro in csrc/core/nf4_core.h."""
    src = (ROOT / "csrc/core/nf4_core.h").read_text()
    body = re.search(rf"#define {name}(.*?)}}", src, re.S).group(1)
    return [float.fromhex(tok.rstrip("f")) for tok in re.findall(r"-?0x[0-9a-fA-F.]+p[+-]\d+f", body)]


@pytest.mark.parametrize("quant_type,macro", [("nf4", "NF4KIT_NF4_VALUES"), ("fp4", "NF4KIT_FP4_VALUES")])
def test_core_header_tables_match_python(quant_type, macro):
    assert _core_literals(macro) == fmt.code_table(quant_type).tolist()


def test_core_header_thresholds_match_python():
    src = (ROOT / "csrc/core/nf4_core.h").read_text()
    for qt, fn in (("nf4", "nf4_encode"), ("fp4", "fp4_encode")):
        body = src[src.index(f"NF4_HD uint8_t {fn}"):]
        body = body[:body.index("\n}\n")]
        lits = {float.fromhex(t.rstrip("f")) for t in re.findall(r"-?0x[0-9a-fA-F.]+p[+-]\d+f", body)}
        mids, _ = fmt.quant_thresholds(qt)
        assert lits == set(mids.tolist()), qt


def test_tables_match_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for qt in ("nf4", "fp4"):
        theirs = bnb_f.get_4bit_type(qt, device="cpu")
        assert torch.equal(fmt.code_table(qt), theirs)
        # bitsandbytes' CPU quantizer sorts its table: our sorted-position -> code map agrees
        assert torch.equal(fmt.code_table(qt)[fmt.quant_thresholds(qt)[1]], theirs.sort().values)


def test_dynamic_map_matches_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    ours = fmt.dynamic_map()
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnb_f.create_dynamic_map(signed=True).float())


def test_nf4_table_from_normal_quantiles():
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np

    pos = scipy_stats.norm.ppf(np.linspace(0.9677083, 0.5, 9)[:-1]).tolist()
    neg = (-scipy_stats.norm.ppf(np.linspace(0.9677083, 0.5, 8)[:-1])).tolist()
    v = torch.tensor(sorted(pos + neg + [0.0]))
    v = v / v.max()
    assert torch.allclose(v.float(), fmt.code_table("nf4"), atol=1e-6)


def test_as_dict_packed_matches_golden_bytes(golden):
    rec = golden["w64x128_nf4_bs64_dq"]
    _, qs = nf4kit.quantize_4bit(rec["input"], blocksize=64, compress_statistics=True)
    d = qs.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"}
    assert bytes(d["quant_state.bitsandbytes__nf4"].tolist()).decode() == rec["packed_quant_state_json"]
    assert torch.equal(d["nested_quant_map"], rec["nested_quant_map"])
    assert torch.equal(d["quant_map"], rec["quant_map"])


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_quant_state_roundtrip(nested, packed):
    A = torch.randn(37, 53) * 3
    p, qs = nf4kit.quantize_4bit(A, blocksize=128, compress_statistics=nested, quant_type="fp4")
    d = {f"weight.{k}": v for k, v in qs.as_dict(packed=packed).items()}
    qs2 = nf4kit.QuantState.from_dict(d, device="cpu")
    assert qs2 == qs
    assert torch.equal(nf4kit.dequantize_4bit(p, qs2), nf4kit.dequantize_4bit(p, qs))


def test_from_dict_loads_bitsandbytes_state_dict(golden):
    lin = golden["linear4bit_128to64_nf4_dq"]
    sd = {k[3:]: v for k, v in lin.items() if k.startswith("sd/")}
    qs = nf4kit.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
                                     device="cpu")
    W = nf4kit.dequantize_4bit(sd["weight"], qs)
    assert torch.equal(W, lin["weight_dequant_after_reload"])
    y = torch.nn.functional.linear(lin["x"], W, sd["bias"])
    torch.testing.assert_close(y, lin["y"], rtol=1e-5, atol=1e-5)


def test_bf16_offset_loads_as_fp32():
    A = torch.randn(64, 64)
    p, qs = nf4kit.quantize_4bit(A, compress_statistics=True)
    d = qs.as_dict(packed=True)
    meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].tolist()))
    # a checkpoint whose offset went through bf16 (the bitsandbytes NaN trap)
    meta["nested_offset"] = float(torch.tensor(meta["nested_offset"]).bfloat16().float())
    d["quant_state.bitsandbytes__nf4"] = fmt.pack_json(meta)
    qs2 = nf4kit.QuantState.from_dict(d)
    assert qs2.offset.dtype == torch.float32
    W = nf4kit.dequantize_4bit(p, qs2)
    assert torch.isfinite(W).all()
    torch.testing.assert_close(W, nf4kit.dequantize_4bit(p, qs), atol=2e-2, rtol=0)
