"""The fine-tuning pieces: the built-in dataset, answer-only loss, exact match, PEFT adapter I/O,
memory arithmetic — on a tiny random Llama (fast), plus the real model's tokenizer."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from nf4kit import memory
from nf4kit.data import tasks
from nf4kit.nn import LoRALinear4bit, LoraConfig, quantize_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest.one_thread


# ---------------------------------------------------------------- dataset
def test_splits_deterministic_and_disjoint():
    tr1, ev1 = tasks.make_splits(300, 60, seed=3)
    tr2, ev2 = tasks.make_splits(300, 60, seed=3)
    assert tr1 == tr2 and ev1 == ev2
    assert len(tr1) == 300 and len(ev1) == 60
    assert not {e.prompt for e in ev1} & {e.prompt for e in tr1}
    assert len({e.prompt for e in ev1}) == 60
    assert {e.task for e in ev1} == set(tasks.TASKS)
    assert tasks.make_splits(300, 60, seed=4)[1] != ev1


def test_task_answers_are_right():
    import random

    r = random.Random(0)
    for _ in range(50):
        p, a = tasks.TASKS["add"](r)
        x, y = p[len("What is "):-1].split(" + ")
        assert int(a) == int(x) + int(y)
        p, a = tasks.TASKS["sort_digits"](r)
        assert a.split() == sorted(p.split(": ")[1].split())
        p, a = tasks.TASKS["reverse_letters"](r)
        assert a.split() == p.split(": ")[1].split()[::-1]
        p, a = tasks.TASKS["convert_units"](r)
        n, src = p.split()[1:3]
        assert int(a) == int(n) * {u[0]: u[2] for u in tasks._UNITS}[src]
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_splits(10, 10, tasks=["nope"])


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer (chat template) from the converted model cache."""
    pytest.importorskip("gguf")
    from nf4kit import finetune

    try:
        path = finetune.resolve_model(None, log=lambda *_: None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def test_encode_labels_only_answer(tokenizer):
    ex = tasks.Example("add", "What is 12 + 30?", "42")
    enc = tasks.encode_example(tokenizer, ex)
    n = enc["prompt_len"][0]
    assert enc["labels"][:n] == [-100] * n
    ans = enc["labels"][n:]
    assert tokenizer.decode(ans) == "42<|im_end|>"
    assert enc["input_ids"][n:] == ans
    prompt = tokenizer.decode(enc["input_ids"][:n])
    assert tasks.SYSTEM_PROMPT in prompt and ex.prompt in prompt and prompt.endswith("assistant\n")


# ---------------------------------------------------------------- tiny model
def tiny_llama(vocab: int = 49152, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_answer_loss_matches_full_loss(tokenizer):
    from nf4kit.finetune import answer_loss, collate

    model = tiny_llama()
    tr, _ = tasks.make_splits(6, 1)
    batch = collate([tasks.encode_example(tokenizer, e) for e in tr], tokenizer.pad_token_id)
    ours = answer_loss(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(float(ours.detach()) - float(ref.detach())) < 1e-5


def test_exact_match_agrees_with_greedy_generation(tokenizer):
    """Overfit a tiny QLoRA model on a few examples; teacher-forced exact match must equal what
    greedy generation produces, example by example."""
    from nf4kit.finetune import exact_match, generate_answers, train_lora

    model = tiny_llama()
    quantize_model(model, lora=LoraConfig(r=8, lora_alpha=16), compute_dtype=torch.float32, progress=False)
    for n, p in model.named_parameters():  # the embeddings too, so that a tiny model can memorise
        if "embed_tokens" in n:
            p.requires_grad_(True)
    exs = [tasks.Example("t", f"What is {i} + 1?", str(i + 1)) for i in (3, 7, 11, 20)]
    encs = [tasks.encode_example(tokenizer, e) for e in exs]
    before = exact_match(model, tokenizer, exs, encs=encs)
    train_lora(model, encs, tokenizer.pad_token_id, steps=60, batch_size=4, lr=1e-2, max_len=None,
               device=torch.device("cpu"), progress=False)
    after = exact_match(model, tokenizer, exs, encs=encs)
    gen = generate_answers(model, tokenizer, exs, max_new_tokens=6)
    gen_ok = [g == e.answer for g, e in zip(gen, exs)]
    assert after["correct"] == sum(gen_ok), (gen, after)
    assert after["accuracy"] > before["accuracy"]


def test_peft_adapter_roundtrip(tmp_path):
    peft = pytest.importorskip("peft")
    from nf4kit.finetune import load_peft_adapter, save_peft_adapter

    base = tiny_llama(vocab=512)
    ours = quantize_model(copy.deepcopy(base), lora=LoraConfig(r=4, lora_alpha=8), compute_dtype=torch.float32,
                          progress=False)
    torch.manual_seed(1)
    for n, p in ours.named_parameters():
        if ".lora_B." in n:
            nn.init.normal_(p, std=0.05)
    save_peft_adapter(ours, tmp_path, LoraConfig(r=4, lora_alpha=8), "tiny-base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert len(sd) == 2 * 7 * 2
    # PEFT loads it onto the float base and gets our layer's LoRA weights
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = torch.randint(0, 512, (2, 9))
    q = pm.base_model.model.model.layers[1].mlp.down_proj
    ref = ours.model.layers[1].mlp.down_proj
    assert torch.equal(q.lora_A["default"].weight, ref.lora_A["default"].weight)
    with torch.no_grad():
        y_peft = pm(input_ids=ids).logits
        y_ours = ours(input_ids=ids).logits
        y_base = base(input_ids=ids).logits
    # differences are the 4-bit base only; the adapter moved both away from the base alike
    assert (y_peft - y_ours).norm() < 0.5 * (y_peft - y_base).norm()
    # and our loader puts it back into a fresh quantized model exactly
    fresh = quantize_model(copy.deepcopy(base), lora=LoraConfig(r=4, lora_alpha=8), compute_dtype=torch.float32,
                           progress=False)
    assert load_peft_adapter(fresh, tmp_path) == 14
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, y_ours)


def test_param_counts_and_model_bytes():
    from nf4kit.finetune import model_bytes, param_counts

    base = tiny_llama(vocab=512)
    total_before = sum(p.numel() for p in base.parameters())
    b_before = model_bytes(base)
    m = quantize_model(base, lora=LoraConfig(r=4), progress=False)
    c = param_counts(m)
    lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    assert c["trainable"] == lora and c["total"] == total_before + lora
    assert model_bytes(m) < b_before


# ---------------------------------------------------------------- memory arithmetic
def test_memory_textbook_160gb():
    est = memory.estimate(params=10e9)
    assert est["rows"]["full fine-tuning"]["total"] == pytest.approx(160e9)
    q = est["rows"]["QLoRA (NF4 base)"]
    assert q["total"] < est["rows"]["LoRA (16-bit base)"]["total"] < 160e9
    assert memory.bits_per_param_4bit(64, True) == pytest.approx(4.127, abs=1e-3)
    assert memory.bits_per_param_4bit(64, False) == 4.5
    # QLoRA weights: target share at 4.127 bits, the rest 16-bit
    assert q["weights"] == pytest.approx(9e9 * 4.127 / 8 + 1e9 * 2, rel=1e-3)
    sgd = memory.estimate(params=1e9, optimizer="sgd", master_weights=False, weight_dtype="fp32")
    assert sgd["rows"]["full fine-tuning"]["total"] == pytest.approx(8e9)
    assert "160.00" in memory.format_table(est)
    with pytest.raises(ValueError):
        memory.estimate(params=-1)


def test_memory_adapter_size_matches_a_real_model():
    """The 1.58·r/d adapter estimate against SmolLM2-135M's real LoRA count (4,884,480 at r=16)."""
    est = memory.estimate(params=106_168_320, r=16, target_share=1.0, hidden=576)
    assert est["lora_params"] == pytest.approx(4_884_480, rel=0.06)


def test_int4_absmax_scheme():
    from nf4kit.evaluate import _int4_absmax

    W = torch.randn(10, 70)
    Wq = _int4_absmax(W, 64)
    flat = W.reshape(-1)
    s = flat[:64].abs().max() / 7
    assert torch.allclose(Wq.reshape(-1)[:64], torch.round(flat[:64] / s).clamp(-7, 7) * s)
    assert len(torch.unique(Wq.reshape(-1)[:64])) <= 15
    assert float((Wq - W).norm() / W.norm()) < 0.2


def test_compare_datatypes_on_tiny_model(tokenizer):
    from nf4kit.evaluate import compare_datatypes, markdown

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, held = tasks.make_splits(10, 6)
    rows = compare_datatypes(model, tokenizer, held, 6, 3, "cpu", log=lambda *_: None)
    names = [r["scheme"] for r in rows]
    assert names[0] == "16-bit (bf16)" and names[-1] == "NF4 + double quant" and len(rows) == 7
    err = {r["scheme"]: r["rel_weight_error"] for r in rows}
    bits = {r["scheme"]: r["bits_per_param"] for r in rows}
    # Gaussian-initialised weights: NF4 beats FP4 and int4 at the same 4.5 bits; int8 beats all 4-bit
    assert err["NF4, blocks of 64"] < err["FP4, blocks of 64"]
    assert err["NF4, blocks of 64"] < err["int4 absmax, blocks of 64"]
    assert err["int8 absmax, blocks of 64"] < err["NF4, blocks of 64"]
    assert err["16-bit (bf16)"] < err["int8 absmax, blocks of 64"]
    assert bits["NF4 + double quant"] == pytest.approx(4.127, abs=1e-3) and bits["NF4, blocks of 64"] == 4.5
    assert all(math.isfinite(r["ppl_heldout"]) and math.isfinite(r["ppl_prose"]) for r in rows)
    for n, p in model.named_parameters():  # the model is restored afterwards
        assert torch.equal(p, before[n]), n
    assert "| NF4 + double quant | 4.127 |" in markdown(rows, None)
    assert markdown(rows, None).splitlines()[0].split("|")[4].strip() == "ppl prose"


def test_quiet_logger_silences_a_libraries_warnings_then_restores_it(caplog):
    """The peft import is wrapped so bitsandbytes' note about an optional CPU kernel stays out of
    `nf4kit finetune`'s output; the logger's own level comes back afterwards."""
    import logging

    from nf4kit.finetune import _quiet_logger

    log = logging.getLogger("nf4kit_test_quiet.child")
    logging.getLogger("nf4kit_test_quiet").setLevel(logging.INFO)
    with caplog.at_level(logging.WARNING, logger="nf4kit_test_quiet"):
        with _quiet_logger("nf4kit_test_quiet"):
            log.warning("hidden")
        log.warning("shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]
    assert logging.getLogger("nf4kit_test_quiet").level == logging.INFO


def test_busy_cores_reads_what_other_processes_use_now(monkeypatch, tmp_path):
    """busy_cores: the CPU time used over its window (not the 1-minute load average, which still
    counts a build that just ended), scaled to the core count; where /proc/stat cannot be read, the
    load average."""
    from nf4kit import finetune

    snaps = iter([(1000, 600), (1200, 700)])  # 200 ticks, 100 of them idle: half the cores busy
    monkeypatch.setattr(finetune.os, "cpu_count", lambda: 4)
    assert finetune.busy_cores(0.0, times=lambda: next(snaps)) == pytest.approx(2.0)

    def unreadable():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(finetune.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert finetune.busy_cores(0.0, times=unreadable) == 1.5
    # /proc/stat's first line: user nice system idle iowait irq softirq steal (guest ticks are not added)
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 20 30 400 50 6 7 8 9 10\ncpu0 5 10 15 200 25 3 3 4 4 5\n")
    assert finetune._cpu_times(str(stat)) == (531, 450)


def test_set_threads_leaves_busy_cores_alone(monkeypatch):
    """n = 0: torch's threads less the cores in use (rounded), at least one; a busy machine is
    reported; an explicit n is taken as given."""
    from nf4kit import finetune

    before = torch.get_num_threads()
    monkeypatch.setattr(finetune.os, "cpu_count", lambda: 4)
    logged = []
    try:
        torch.set_num_threads(2)  # torch's default here
        assert finetune.set_threads(0, logged.append, busy=0.3) == 2 and logged == []
        assert finetune.set_threads(0, logged.append, busy=2.6) == 1  # 3 of 4 cores taken
        assert "2.6 cores in use: using 1 of 2" in logged[-1]
        torch.set_num_threads(2)
        assert finetune.set_threads(0, logged.append, busy=2.4) == 2  # 2 of 4 taken, 2 free
        assert finetune.set_threads(3, logged.append) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
