"""Checkpoints and adapters cross between nf4kit, stock transformers + bitsandbytes and stock
PEFT with the same outputs: a tiny random Llama (hidden 64, 2 layers) saved to tmp_path, and
once SmolLM2-135M.

Stock bitsandbytes models run in train mode with no dropout: in eval mode, on CPUs with
AVX512-BF16, bitsandbytes repacks its weights and computes in bf16, which is a different
(rounded) computation.  Intermediate size 128 keeps every row a whole number of 64-blocks:
bitsandbytes 0.50.2's AVX-512 CPU dequantize is wrong when blocks cross rows (see
test_bitsandbytes_backend.py::test_rows_crossing_blocks_are_right and the K=96 test below).
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import bitsandbytes as bnb  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import nf4kit  # noqa: E402
import nf4kit.integrations.peft as npeft  # noqa: E402
from nf4kit.integrations import bitsandbytes as nbnb  # noqa: E402
from nf4kit.integrations import transformers as ntr  # noqa: E402

from_pretrained = getattr(nf4kit, "from_pretrained", ntr.from_pretrained)
# Importing nf4kit.integrations.peft registers the fused layer for every new LoraConfig; keep
# that to these tests (the autouse fixture turns it on) so other test files see stock PEFT.
npeft.disable()


@pytest.fixture(autouse=True)
def _stock_bnb_kernels_and_peft_registration():
    """Stock bitsandbytes kernels (whatever the entry point did); PEFT registration on; both
    restored afterwards."""
    was_bnb, was_peft = nbnb.is_enabled(), npeft.is_enabled()
    nbnb.disable()
    npeft.enable()
    yield
    nbnb.disable()
    if was_bnb:
        nbnb.enable()
    (npeft.enable if was_peft else npeft.disable)()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def tiny_llama(path, intermediate=128, tie=False, seed=0) -> str:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def stock_bnb(path, quantize: bool = False):
    """Stock transformers + bitsandbytes (4-bit NF4, double quant, fp32 compute), train mode."""
    kw = {}
    if quantize:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
        kw["dtype"] = torch.float32
    m = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw)
    return m.train()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    fp = tiny_llama(root / "fp")
    was = nbnb.is_enabled()
    nbnb.disable()
    stock_bnb(fp, quantize=True).save_pretrained(root / "bnb")   # a checkpoint written by stock bnb
    if was:
        nbnb.enable()
    return {"fp": fp, "bnb": str(root / "bnb"), "root": root}


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 128, (2, 11), generator=g)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ---------------------------------------------------------------- transformers checkpoints
def test_from_pretrained_reads_bnb_checkpoint_as_stored(dirs, ids):
    model = from_pretrained(dirs["bnb"])
    sd = ntr.read_state_dict(dirs["bnb"])
    layers = {n: m for n, m in linears(model).items() if isinstance(m, nf4kit.nn.Linear4bit)}
    assert len(layers) == 14 and not isinstance(model.lm_head, nf4kit.nn.Linear4bit)
    for n, m in layers.items():  # no re-quantization: the file's bytes and states
        assert torch.equal(m.weight.reshape(-1), sd[n + ".weight"].reshape(-1))
        assert torch.equal(m.quant_state.absmax, sd[n + ".weight.absmax"])
        assert torch.equal(m.quant_state.state2.absmax, sd[n + ".weight.nested_absmax"])
    stock = stock_bnb(dirs["bnb"])
    with torch.no_grad():
        y, y0 = model(ids).logits, stock(ids).logits
    assert rel(y, y0) < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_cli_writes_checkpoint_stock_loads(dirs, ids, tie, tmp_path):
    src = dirs["fp"] if not tie else tiny_llama(tmp_path / "fp_tied", tie=True, seed=1)
    out = tmp_path / "q"
    parser = argparse.ArgumentParser(prog="nf4kit")
    ntr.add_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["quantize", src, str(out), "--compute-dtype", "float32"])
    assert args.func(args) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"

    stock = stock_bnb(str(out))                                   # stock transformers + bitsandbytes
    assert isinstance(stock.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    mine = from_pretrained(str(out))
    with torch.no_grad():
        y_stock, y_mine = stock(ids).logits, mine(ids).logits
    assert rel(y_mine, y_stock) < 1e-5
    # and the same 4-bit codes stock bitsandbytes makes from the float checkpoint
    ref = stock_bnb(src, quantize=True)
    with torch.no_grad():
        y_ref = ref(ids).logits
    for n, m in linears(ref).items():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.reshape(-1), mine.get_submodule(n).weight.reshape(-1)), n
    assert rel(y_mine, y_ref) < 1e-3          # nested absmax: bnb's CPU LUT vs exact nearest
    if tie:
        assert mine.lm_head.weight is mine.model.embed_tokens.weight


def test_float_checkpoint_quantized_on_load(dirs, ids):
    m = from_pretrained(dirs["fp"], compute_dtype="float32")
    assert isinstance(m.model.layers[1].self_attn.o_proj, nf4kit.nn.Linear4bit)
    fp = AutoModelForCausalLM.from_pretrained(dirs["fp"], dtype=torch.float32)
    with torch.no_grad():
        assert rel(m(ids).logits, fp(ids).logits) < 0.2    # 4-bit vs float: close, not equal


def test_rows_crossing_blocks_model(tmp_path, ids):
    """K = 96 with blocksize 64: nf4kit reads the checkpoint exactly; stock bitsandbytes on
    this CPU agrees once nf4kit serves its kernels."""
    fp = tiny_llama(tmp_path / "fp96", intermediate=96, seed=2)
    stock_bnb(fp, quantize=True).save_pretrained(tmp_path / "bnb96")
    mine = from_pretrained(str(tmp_path / "bnb96"))
    stock = stock_bnb(str(tmp_path / "bnb96"))
    with torch.no_grad(), nbnb.enabled():
        y_stock_nf4kit = stock(ids).logits
    with torch.no_grad():
        y = mine(ids).logits
    assert rel(y, y_stock_nf4kit) < 1e-6


# ---------------------------------------------------------------- PEFT
def lora_cfg(**kw):
    base = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    base.update(kw)
    return LoraConfig(**base)


def train_steps(model, ids, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss


def test_nf4kit_adapter_loads_on_stock_peft_bnb(dirs, ids, tmp_path):
    model = from_pretrained(dirs["bnb"])
    pm = get_peft_model(model, lora_cfg())
    layers = [m for m in pm.modules() if isinstance(m, npeft.FusedLoraLinear4bit)]
    assert len(layers) == 14
    before = npeft.call_counts["fused"]
    pm.train()
    train_steps(pm, ids)
    assert npeft.call_counts["fused"] - before >= 14 * 2
    assert all(float(m.lora_B["default"].weight.detach().abs().sum()) > 0 for m in layers)   # it trained
    pm.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        y_mine = pm(ids).logits

    npeft.disable()                                   # stock PEFT + stock bitsandbytes
    stock = PeftModel.from_pretrained(stock_bnb(dirs["bnb"]), str(tmp_path / "ad"))
    stock.train()
    assert not any(isinstance(m, npeft.FusedLoraLinear4bit) for m in stock.modules())
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in stock.modules())
    with torch.no_grad():
        y_stock = stock(ids).logits
    assert rel(y_mine, y_stock) < 1e-5


def test_stock_adapter_loads_on_nf4kit_and_bnb_model_runs_fused(dirs, ids, tmp_path):
    npeft.disable()
    torch.manual_seed(5)
    stock = get_peft_model(stock_bnb(dirs["bnb"]), lora_cfg(init_lora_weights=False))
    stock.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        y_stock = stock(ids).logits

    npeft.enable()
    mine = PeftModel.from_pretrained(from_pretrained(dirs["bnb"]), str(tmp_path / "ad"))
    assert sum(isinstance(m, npeft.FusedLoraLinear4bit) for m in mine.modules()) == 14
    # the same adapter on a stock bitsandbytes-4bit model, through the fused layer
    on_bnb = PeftModel.from_pretrained(stock_bnb(dirs["bnb"]), str(tmp_path / "ad"))
    fused = [m for m in on_bnb.modules() if isinstance(m, npeft.FusedLoraLinear4bit)]
    assert len(fused) == 14 and isinstance(fused[0].base_layer, bnb.nn.Linear4bit)
    before = npeft.call_counts["fused"]
    with torch.no_grad():
        y_mine, y_on_bnb = mine(ids).logits, on_bnb(ids).logits
    assert npeft.call_counts["fused"] - before == 28
    assert rel(y_mine, y_stock) < 1e-5 and rel(y_on_bnb, y_stock) < 1e-5


def test_merge_and_unload_to_dense_and_unmerge_restores(dirs, ids):
    torch.manual_seed(6)
    pm = get_peft_model(from_pretrained(dirs["bnb"]), lora_cfg(init_lora_weights=False))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = pm(ids).logits
        pm.merge_adapter()
        assert isinstance(layer.base_layer, torch.nn.Linear) and not isinstance(layer.base_layer,
                                                                                  nf4kit.nn.Linear4bit)
        assert rel(pm(ids).logits, y) < 1e-5
        pm.unmerge_adapter()
        assert isinstance(layer.base_layer, nf4kit.nn.Linear4bit)
        assert torch.equal(layer.base_layer.weight, packed)
        assert rel(pm(ids).logits, y) < 1e-6
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, (nf4kit.nn.Linear4bit, npeft.FusedLoraLinear4bit, bnb.nn.Linear4bit))
                   for m in merged.modules())
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32   # the checkpoint's dtype
    with torch.no_grad():
        assert rel(merged(ids).logits, y) < 1e-5


def test_dropout_and_second_adapter_paths(dirs, ids):
    """Training with LoRA dropout runs the base through nf4kit and that LoRA term in torch
    ("split"); with a second, dropout-free adapter active, that one is fused and the first
    added in torch; gradients reach both adapters' A and B."""
    torch.manual_seed(7)
    pm = get_peft_model(from_pretrained(dirs["bnb"]), lora_cfg(lora_dropout=0.1, init_lora_weights=False))
    pm.train()
    before = dict(npeft.call_counts)
    pm(ids, labels=ids).loss.backward()
    assert npeft.call_counts["split"] - before.get("split", 0) == 14
    assert npeft.call_counts["fused"] == before.get("fused", 0)

    pm.add_adapter("second", lora_cfg(init_lora_weights=False))
    pm.base_model.set_adapter(["default", "second"])
    pm.train()
    pm.zero_grad()
    before = dict(npeft.call_counts)
    pm(ids, labels=ids).loss.backward()
    assert npeft.call_counts["fused"] - before.get("fused", 0) == 14
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    for name in ("default", "second"):
        assert q.lora_A[name].weight.grad is not None and float(q.lora_B[name].weight.grad.abs().sum()) > 0
    pm.eval()                                   # eval: no dropout; matches the unfused sum
    with torch.no_grad():
        x = torch.randn(3, 64)
        base = q.base_layer(x)
        want = base + sum(q.lora_B[a](q.lora_A[a](x)) * q.scaling[a] for a in ("default", "second"))
        assert rel(q(x), want) < 1e-5


# ---------------------------------------------------------------- SmolLM2-135M, once
def _smollm2_dir():
    try:
        from nf4kit.finetune import resolve_model

        return resolve_model(None, log=lambda *a, **k: None)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2-135M not available offline ({type(e).__name__}: {e})")


@pytest.mark.slow
def test_smollm2_checkpoint_round_trip(tmp_path):
    src = _smollm2_dir()
    out = tmp_path / "smol4"
    ntr.quantize_checkpoint(src, out, compute_dtype="float32")
    mine = from_pretrained(str(out))
    stock = stock_bnb(str(out))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_mine, y_stock = mine(ids).logits, stock(ids).logits
    assert rel(y_mine, y_stock) < 1e-4
    assert sum(isinstance(m, nf4kit.nn.Linear4bit) for m in mine.modules()) == 30 * 7
    files = {p.name for p in out.iterdir()}
    assert "tokenizer.json" in files or "tokenizer_config.json" in files
    assert os.path.getsize(out / "model.safetensors") < 0.5 * sum(
        p.stat().st_size for p in src.glob("*.safetensors"))
