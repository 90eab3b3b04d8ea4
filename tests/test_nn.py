"""The drop-in layers: Linear4bit (bitsandbytes-format state dict), LoRALinear4bit (PEFT layout),
quantize_model, and torch.compile(fullgraph=True) over a model built of them."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nf4kit
from nf4kit.nn import Linear4bit, LoRALinear4bit, LoraConfig, quantize_model

BNB_KEYS = ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest.one_thread


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_exports():
    assert nf4kit.LoraConfig is LoraConfig and nf4kit.quantize_model is quantize_model
    assert nf4kit.nn.Linear4bit is Linear4bit and nf4kit.nn.LoRALinear4bit is LoRALinear4bit


# ---------------------------------------------------------------- Linear4bit
def test_linear4bit_is_linear_with_packed_weight():
    layer = Linear4bit(100, 36, bias=True)
    assert isinstance(layer, nn.Linear)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (1800, 1)
    assert not layer.weight.requires_grad
    assert layer.weight.quant_state is layer.quant_state and layer.quant_state.nested
    assert layer.quant_state.shape == (36, 100)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear4bit_forward(compute_dtype, in_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(72, 40)
    layer = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(3, 4, 72).to(in_dtype)
    y = layer(x)
    assert y.dtype == in_dtype and y.shape == (3, 4, 40)
    cdt = compute_dtype or in_dtype
    ref = x.to(cdt).double() @ layer.dequantize(cdt).double().t() + lin.bias.to(cdt).double()
    assert rel(y, ref) < (1e-5 if cdt == torch.float32 and in_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
def test_from_linear_matches_quantize_4bit(quant_type, compress):
    lin = nn.Linear(130, 17, bias=False)
    layer = Linear4bit.from_linear(lin, blocksize=32, compress_statistics=compress, quant_type=quant_type)
    packed, qs = nf4kit.quantize_4bit(lin.weight.detach(), blocksize=32, compress_statistics=compress,
                                      quant_type=quant_type)
    assert torch.equal(layer.weight, packed) and layer.quant_state == qs
    assert layer.bias is None


def test_state_dict_keys_and_roundtrip():
    torch.manual_seed(1)
    layer = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    sd = layer.state_dict()
    assert list(sd) == BNB_KEYS
    assert sd["weight"].dtype == torch.uint8
    x = torch.randn(5, 128)
    for fresh in (Linear4bit(128, 64), Linear4bit(128, 64, device="meta")):
        fresh.compute_dtype = torch.float32
        res = fresh.load_state_dict(sd)
        assert not res.missing_keys and not res.unexpected_keys
        assert fresh.quant_state == layer.quant_state
        assert torch.equal(fresh(x), layer(x))
    # the state dict survives torch.save / weights_only load
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    fresh = Linear4bit(128, 64, compute_dtype=torch.float32)
    fresh.load_state_dict(sd2)
    assert torch.equal(fresh(x), layer(x))


def test_loads_bitsandbytes_saved_state_dict(golden):
    case = golden["linear4bit_128to64_nf4_dq"]
    sd = {k[3:]: v for k, v in case.items() if k.startswith("sd/")}
    layer = Linear4bit(128, 64, device="meta")
    layer.load_state_dict(sd)
    y = layer(case["x"])
    assert rel(y, case["y"]) < 1e-6
    assert torch.equal(layer.dequantize(), case["weight_dequant_after_reload"])
    # and what we save is what bitsandbytes saved
    out = layer.state_dict()
    assert list(out) == BNB_KEYS
    for k in BNB_KEYS:
        assert torch.equal(out[k], sd[k]), k


def test_bitsandbytes_reads_our_state():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bF

    torch.manual_seed(2)
    layer = Linear4bit.from_linear(nn.Linear(256, 48))
    sd = layer.state_dict()
    qs_items = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    bqs = bF.QuantState.from_dict(qs_items, device=torch.device("cpu"))
    W_bnb = bF.dequantize_4bit(sd["weight"], bqs)
    assert torch.equal(W_bnb, layer.dequantize())
    del bnb


def test_load_float_weight_quantizes():
    lin = nn.Linear(64, 24)
    layer = Linear4bit(64, 24, blocksize=128, compress_statistics=False)
    layer.load_state_dict(lin.state_dict())
    packed, qs = nf4kit.quantize_4bit(lin.weight.detach(), blocksize=128, compress_statistics=False)
    assert torch.equal(layer.weight, packed) and layer.quant_state == qs
    assert torch.equal(layer.bias, lin.bias)


def test_load_errors_are_clear():
    layer = Linear4bit(64, 24)
    sd = layer.state_dict()
    bad = {"weight": sd["weight"], "bias": sd["bias"]}  # packed but no quant state
    with pytest.raises(RuntimeError, match="quant_state"):
        Linear4bit(64, 24).load_state_dict(bad)
    other = Linear4bit(64, 32).state_dict()
    with pytest.raises(RuntimeError, match="shape"):
        Linear4bit(64, 24).load_state_dict({**other, "bias": sd["bias"]})
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear4bit(64, 24).load_state_dict({"bias": sd["bias"]})
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 63))


def test_dtype_casts_leave_packed_state_alone():
    torch.manual_seed(3)
    layer = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=None)
    packed, qs = layer.weight.detach().clone(), layer.quant_state.clone()
    layer.to(torch.bfloat16)
    layer.half()
    layer.float()
    assert torch.equal(layer.weight, packed) and layer.quant_state == qs
    assert layer.bias.dtype == torch.float32
    layer.to("cpu")
    assert layer.weight.quant_state is layer.quant_state


def test_quant_storage_bf16():
    torch.manual_seed(4)
    lin = nn.Linear(64, 32)
    ref = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    st = Linear4bit.from_linear(lin, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    assert st.weight.dtype == torch.bfloat16
    st.to(torch.float16)  # must not reinterpret the packed bytes
    assert st.weight.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    assert torch.equal(st(x), ref(x))
    re = Linear4bit(64, 32, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    re.load_state_dict(st.state_dict())
    assert torch.equal(re(x), ref(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move():
    torch.manual_seed(5)
    layer = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float16)
    x = torch.randn(2, 128)
    y = layer(x)
    layer.cuda()
    assert layer.weight.is_cuda and layer.quant_state.absmax.is_cuda and layer.quant_state.state2.absmax.is_cuda
    assert rel(layer(x.cuda()).cpu(), y) < 1e-2


def test_deepcopy():
    layer = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    c = copy.deepcopy(layer)
    x = torch.randn(2, 64)
    assert torch.equal(c(x), layer(x))
    assert c.quant_state is not layer.quant_state


# ---------------------------------------------------------------- LoRALinear4bit
def test_lora_layout_and_init():
    torch.manual_seed(6)
    lin = nn.Linear(96, 40)
    layer = LoRALinear4bit.from_linear(lin, r=8, lora_alpha=16, compute_dtype=torch.float32)
    assert isinstance(layer.base_layer, Linear4bit)
    assert isinstance(layer.lora_A, nn.ModuleDict) and isinstance(layer.lora_B["default"], nn.Linear)
    assert layer.lora_A["default"].weight.shape == (8, 96) and layer.lora_B["default"].weight.shape == (40, 8)
    assert layer.scaling == {"default": 2.0}
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    A = layer.lora_A["default"].weight
    bound = 1 / 96 ** 0.5  # kaiming_uniform(a=√5) on fan_in 96
    assert A.abs().max() <= bound and A.std() > bound / 3
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: starts as the base
    keys = set(layer.state_dict())
    assert {"lora_A.default.weight", "lora_B.default.weight", "base_layer.weight",
            "base_layer.weight.absmax"} <= keys
    rs = LoRALinear4bit.from_linear(lin, r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16], ids=str)
def test_lora_forward_and_merge(cdt):
    torch.manual_seed(7)
    lin = nn.Linear(96, 40)
    layer = LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8, compute_dtype=cdt)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    x = torch.randn(2, 3, 96)
    y = layer(x)
    W = layer.base_layer.dequantize(torch.float32).double()
    dW = layer.get_delta_weight().double()
    ref = x.double() @ (W + dW).t() + lin.bias.double()
    tol = 1e-5 if cdt == torch.float32 else 1e-2
    assert rel(y, ref) < tol
    merged = layer.merge_and_dequantize()
    assert type(merged) is nn.Linear and merged.weight.dtype == cdt
    assert rel(merged.weight, W + dW) < (1e-6 if cdt == torch.float32 else 1e-2)
    assert rel(merged(x.to(cdt)), ref) < tol


def test_enable_disable_adapters():
    torch.manual_seed(8)
    layer = LoRALinear4bit.from_linear(nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 64)
    on = layer(x)
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    assert torch.equal(layer(x), on) and not torch.equal(on, layer.base_layer(x))


def test_lora_state_dict_roundtrip_peft_keys():
    torch.manual_seed(9)
    layer = LoRALinear4bit.from_linear(nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    nn.init.normal_(layer.lora_B["default"].weight)
    sd = layer.state_dict()
    other = LoRALinear4bit.from_linear(nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    other.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))


# ---------------------------------------------------------------- quantize_model
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False), "v_proj": nn.Linear(32, 32),
                                    "mlp": nn.Linear(32, 64)})
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.block["q_proj"](h) + self.block["v_proj"](h)
        h = torch.nn.functional.gelu(self.block["mlp"](h))
        return self.lm_head(self.norm(h))


def test_quantize_model_qlora():
    torch.manual_seed(10)
    m = Tiny()
    ids = torch.randint(0, 50, (2, 7))
    ref = m(ids)
    out = quantize_model(m, lora=LoraConfig(r=4, lora_alpha=8), compute_dtype=torch.float32, progress=False)
    assert out is m
    for name in ("q_proj", "v_proj", "mlp"):
        assert isinstance(m.block[name], LoRALinear4bit)
    assert type(m.lm_head) is nn.Linear
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    y = m(ids)
    assert rel(y, ref) < 0.2  # 4-bit error only (B = 0)
    y.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


def test_quantize_model_targets():
    m = quantize_model(Tiny(), target_modules=["q_proj"], lora=None, progress=False)
    assert isinstance(m.block["q_proj"], Linear4bit) and type(m.block["v_proj"]) is nn.Linear
    m = quantize_model(Tiny(), target_modules=r".*_proj", progress=False)
    assert isinstance(m.block["v_proj"], Linear4bit) and type(m.block["mlp"]) is nn.Linear
    m = quantize_model(Tiny(), skip_modules=(), progress=False)
    assert isinstance(m.lm_head, Linear4bit)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(Tiny(), target_modules=["nothing"], progress=False)


def test_quantize_model_progress_bar(capsys):
    pytest.importorskip("tqdm")
    quantize_model(Tiny(), progress=True)
    assert "quantizing" in capsys.readouterr().err


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("with_bias", [True, False])
def test_compile_fullgraph_no_graph_break(with_bias):
    torch.manual_seed(11)
    m = Tiny()
    if not with_bias:
        m.block["v_proj"] = nn.Linear(32, 32, bias=False)
    quantize_model(m, lora=LoraConfig(r=4), compute_dtype=torch.float32, progress=False)
    for n, p in m.named_parameters():
        if ".lora_B." in n:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (2, 5))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    y = m(ids)
    y.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    yc = cm(ids)
    yc.square().mean().backward()
    assert rel(yc, y) < 1e-6
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, ref[n]) < 1e-5, n


@pytest.mark.slow
def test_compile_inductor():
    torch.manual_seed(12)
    m = quantize_model(Tiny(), lora=LoraConfig(r=4), compute_dtype=torch.float32, progress=False)
    ids = torch.randint(0, 50, (2, 5))
    y = m(ids)
    torch._dynamo.reset()
    yc = torch.compile(m, fullgraph=True)(ids)
    assert rel(yc, y) < 1e-5


# ---------------------------------------------------------------------- bad state and input at forward
def _broken(what, called_before):
    """A 64 -> 12 layer (double quant) with one thing changed after construction (called_before:
    after a forward that passed the checks, which the layer then remembers)."""
    layer = Linear4bit(64, 12, compute_dtype=None)
    if called_before:
        layer(torch.randn(2, 64))
    qs = layer.quant_state
    if what == "absmax":
        qs.absmax = qs.absmax[:1].clone()
    elif what == "nested_absmax":
        qs.state2.absmax = torch.empty(0)
    elif what == "packed":
        layer.weight.data = layer.weight.data[:4]
    elif what == "shape":
        qs.shape = torch.Size((24, 64))
    elif what == "blocksize":
        qs.blocksize = 32
    elif what == "bias_short":
        layer.bias = nn.Parameter(torch.randn(6))
    elif what == "bias_long":
        layer.bias = nn.Parameter(torch.randn(24))
    elif what == "bias_one":
        layer.bias = nn.Parameter(torch.randn(1))
    return layer


@pytest.mark.parametrize("what,match", [
    ("absmax", "absmax has 1 entries"), ("nested_absmax", "nested_absmax"), ("packed", "packed weight holds"),
    ("shape", "absmax has 12 entries"), ("blocksize", "absmax has 12 entries"), ("bias_short", "bias must have shape"),
    ("bias_long", "bias must have shape"), ("bias_one", "bias must have shape")])
@pytest.mark.parametrize("called_before", [False, True])
def test_forward_checks_the_layers_state(backend_device, what, match, called_before):
    """A state, packed weight or bias changed after construction is refused at forward with the
    functional API's message, before any kernel reads past a buffer (the cpu and triton kernels
    trust their arguments: a short absmax was read out of bounds, a short bias past its end), also
    when an earlier call had passed the checks (the layer skips them while nothing changed)."""
    layer = _broken(what, called_before)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("x,err,match", [
    (torch.randint(-3, 3, (3, 64)), TypeError, "floating-point"),
    (torch.ones(3, 64, dtype=torch.bool), TypeError, "floating-point"),
    (torch.ones(3, 64, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.tensor(1.0), ValueError, "in_features=64"),
    ([0.0] * 64, TypeError, "torch.Tensor")])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_forward_refuses_non_float_input(x, err, match, compute_dtype):
    """Integer, bool and complex inputs were cast to the compute dtype (or computed in int64 with a
    truncated weight) and gave garbage; 0-d and non-tensor inputs gave Python-internal errors."""
    with pytest.raises(err, match=match):
        Linear4bit(64, 12, compute_dtype=compute_dtype)(x)


def test_forward_takes_fp64_input_where_a_compute_dtype_is_set():
    layer = Linear4bit(64, 12, compute_dtype=torch.float32)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, layer(x.float()).double())


def test_meta_layer_forward_names_the_devices():
    """A layer built on the meta device and never loaded has no values: a CPU input is refused
    (it used to return uninitialised memory)."""
    with pytest.raises(ValueError, match="different devices.*meta"):
        Linear4bit(64, 12, device="meta")(torch.randn(3, 64))


def test_meta_layers_materialise_and_load():
    """to_empty() / .to("meta") cross the meta device (a new Parameter; set_data cannot), and
    quantize_model over a meta-built model gives meta layers that to_empty + load_state_dict fill."""
    src = Linear4bit(64, 12)
    layer = Linear4bit(64, 12, device="meta").to_empty(device="cpu")
    assert layer.weight.device.type == "cpu" and layer.quant_state.device.type == "cpu"
    assert layer.weight.quant_state is layer.quant_state
    layer.load_state_dict(src.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), src(x))
    moved = Linear4bit(64, 12).to("meta")
    assert moved.weight.is_meta and moved.quant_state.absmax.is_meta
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    dense = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    ref = quantize_model(copy.deepcopy(dense), compute_dtype=None, skip_modules=(), progress=False)
    quantize_model(model, compute_dtype=None, skip_modules=(), progress=False)
    assert model[0].weight.is_meta
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_meta_model_runs_for_shapes(backend):
    """A QLoRA model built on the meta device (init_empty_weights) runs forward and backward there
    for its shapes and dtypes, as nn.Linear does; torch's autocast query had raised "unknown device
    type" on meta, in the layers and in matmul_4bit itself."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 24))
    quantize_model(model, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), compute_dtype=torch.bfloat16,
                   skip_modules=(), progress=False)
    x = torch.randn(2, 5, 64, device="meta", requires_grad=True)
    with nf4kit.use_backend(backend):
        y = model(x)
        assert y.is_meta and y.shape == (2, 5, 24) and y.dtype == torch.float32
        y.sum().backward()
        assert x.grad.is_meta and x.grad.shape == x.shape
        a = model[0].lora_A["default"].weight
        assert a.grad.is_meta and a.grad.shape == a.shape
        packed, qs = nf4kit.quantize_4bit(torch.randn(24, 40))
        z = nf4kit.matmul_4bit(torch.randn(3, 40, device="meta", dtype=torch.float16), packed.to("meta"), qs.to("meta"))
        assert z.is_meta and z.shape == (3, 24) and z.dtype == torch.float16


def test_lora_adapter_checks():
    """A non-finite scaling, an adapter of the wrong shape (also on the dropout path) and r <= 0 in
    update_layer are refused with their names (they gave all-NaN output, torch's matmul error or a
    ZeroDivisionError)."""
    x = torch.randn(3, 64)
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_alpha"):
            LoRALinear4bit.from_linear(nn.Linear(64, 12), r=4, lora_alpha=alpha)
    lora = LoRALinear4bit.from_linear(nn.Linear(64, 12), r=4, compute_dtype=None)
    lora.scaling["default"] = float("nan")
    with pytest.raises(ValueError, match="scaling"):
        lora(x)
    for r in (0, -1, 2.0):
        with pytest.raises(ValueError, match="r must be a positive int"):
            lora.update_layer("other", r, 8)
    for dropout in (0.0, 0.1):
        lora = LoRALinear4bit.from_linear(nn.Linear(64, 12), r=4, lora_dropout=dropout, compute_dtype=None).train()
        lora.lora_B["default"] = nn.Linear(4, 1, bias=False)  # [1, r]: was broadcast over every output
        with pytest.raises(ValueError, match="lora_B"):
            lora(x)


class _Doubled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_quantize_model_leaves_what_it_cannot_convert():
    """nn.Linear subclasses that override forward, and MultiheadAttention's out_proj (read by weight),
    stay in full precision with a warning under "all-linear", and are refused when asked for by name;
    a bad regex, a bad target type and a float64 layer are refused before anything is converted."""
    model = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 3, 16)
    with pytest.warns(UserWarning, match="self_attn.out_proj"):
        quantize_model(model, compute_dtype=None, progress=False)
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.linear1, Linear4bit)
    assert model(x).shape == x.shape
    doubled = nn.Sequential(_Doubled(8, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="0"):
        quantize_model(doubled, compute_dtype=None, skip_modules=(), progress=False)
    assert type(doubled[0]) is _Doubled and isinstance(doubled[1], Linear4bit)
    with pytest.raises(ValueError, match="overrides nn.Linear's forward"):
        quantize_model(nn.Sequential(_Doubled(8, 8)), target_modules=["0"], progress=False)
    with pytest.raises(ValueError, match="not a valid regex"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), target_modules="(", progress=False)
    with pytest.raises(TypeError, match="target_modules"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), target_modules=5, progress=False)
    mixed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    with pytest.raises(TypeError, match="1 has a torch.float64 weight"):
        quantize_model(mixed, skip_modules=(), progress=False)
    assert type(mixed[0]) is nn.Linear  # nothing converted
