"""End-to-end benchmark on the real model (issue 7, item 7), side by side in one run.

  python -m benchmarks.e2e_cpu [--model PATH] [--steps 3] [--new-tokens 64] [--json out.json]

1. One QLoRA training step, batch 4 x 128 tokens, LoRA r=16 on every linear layer but lm_head,
   causal-LM loss on all tokens:
     nf4kit (NF4 + double quant, its default compute dtype and fp32),
     PEFT + bitsandbytes 4-bit (NF4 + double quant, fp32 compute),
     PEFT LoRA on the fp32 base (reference).
2. Greedy decoding tokens/s (batch 1, 64 new tokens, KV cache):
     fp32 model, bitsandbytes 4-bit, nf4kit 4-bit (no adapter).

Every variant runs in its own subprocess so that its peak RSS (VmHWM) is its own.  Medians of
--steps timed steps after one warm-up step.  On a GPU (--device cuda) the same variants run on
the GPU, with CUDA peak allocation instead of RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

TRAIN_VARIANTS = ["nf4kit", "nf4kit-fp32", "peft-bnb", "peft-fp32"]
DECODE_VARIANTS = ["fp32", "bnb-4bit", "nf4kit-4bit", "nf4kit-4bit-fp32"]


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _load(args, quant: str | None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nf4kit.finetune import _silence_transformers, resolve_model

    _silence_transformers()
    path = resolve_model(args.model, log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(str(path))
    kw: dict[str, Any] = {"dtype": dtype}
    if quant == "bnb":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = args.device
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if quant != "bnb":
        model.to(args.device)
    return model, tok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_train(args, variant: str) -> dict[str, Any]:
    import nf4kit
    from nf4kit.finetune import pick_dtype

    dev = torch.device(args.device)
    if variant.startswith("nf4kit"):
        cdt = torch.float32 if variant.endswith("fp32") else pick_dtype("auto", dev)
        model, tok = _load(args, None, cdt)
        nf4kit.quantize_model(model, lora=nf4kit.LoraConfig(r=16, lora_alpha=32), compute_dtype=cdt, progress=False)
    else:
        from peft import LoraConfig, get_peft_model

        model, tok = _load(args, "bnb" if variant == "peft-bnb" else None)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        cdt = torch.float32
    model.config.use_cache = False
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tok.vocab_size - 100, (4, 128), generator=g).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.steps + 1):
        _sync(args.device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "compute_dtype": str(cdt).replace("torch.", ""), "step_s": statistics.median(times),
            "steps_s": times, "trainable": sum(p.numel() for p in params), "peak_bytes": _peak(args.device),
            "loss": float(loss.detach())}


def run_decode(args, variant: str) -> dict[str, Any]:
    import nf4kit
    from nf4kit.finetune import pick_dtype

    dev = torch.device(args.device)
    cdt = torch.float32
    if variant == "bnb-4bit":
        model, tok = _load(args, "bnb")
    else:
        model, tok = _load(args, None)
        if variant.startswith("nf4kit"):
            cdt = torch.float32 if variant.endswith("fp32") else pick_dtype("auto", dev)
            model.to(cdt)
            nf4kit.quantize_model(model, lora=None, compute_dtype=cdt, progress=False)
    model.eval()
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    ids = ids.to(dev)
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        _sync(args.device)
        dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"variant": variant, "compute_dtype": str(cdt).replace("torch.", ""), "tokens": n, "seconds": dt,
            "tok_s": n / dt, "peak_bytes": _peak(args.device),
            "text": tok.decode(out[0, ids.shape[1]:ids.shape[1] + 24], skip_special_tokens=True)}


def _child(args) -> None:
    kind, variant = args.child.split(":", 1)
    try:
        res = run_train(args, variant) if kind == "train" else run_decode(args, variant)
    except Exception as e:  # a variant that cannot run here (e.g. bitsandbytes missing) is reported, not fatal
        res = {"variant": variant, "error": f"{type(e).__name__}: {e}"}
    print("@@RESULT@@" + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--only", choices=["train", "decode"], default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    results: dict[str, list] = {"train": [], "decode": []}
    jobs = ([("train", v) for v in TRAIN_VARIANTS] if args.only in (None, "train") else []) + \
           ([("decode", v) for v in DECODE_VARIANTS] if args.only in (None, "decode") else [])
    for kind, v in jobs:
        cmd = [sys.executable, "-m", "benchmarks.e2e_cpu", "--child", f"{kind}:{v}", "--device", args.device,
               "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)] + \
              (["--model", args.model] if args.model else [])
        t0 = time.time()
        # NF4KIT_BNB_BACKEND=0: the bitsandbytes variants run stock bitsandbytes (nf4kit's entry
        # point would otherwise register nf4kit's kernels as bitsandbytes' backend on import).
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, NF4KIT_BNB_BACKEND="0"),
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
        res = json.loads(line[len("@@RESULT@@"):]) if line else {"variant": v, "error": proc.stderr[-800:]}
        results[kind].append(res)
        print(f"[{kind}] {v}: {json.dumps({k: x for k, x in res.items() if k not in ('steps_s', 'text')})} "
              f"({time.time() - t0:.0f} s)", flush=True)
    print()
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "results": results}, f, indent=2)


def report(results: dict[str, list], args) -> str:
    out = [f"End-to-end on {args.device} (SmolLM2-135M-Instruct; torch {torch.__version__}; "
           f"{os.cpu_count()} CPUs)", "",
           "| training step, 4 x 128 tokens, LoRA r=16 all linear | compute | s/step | peak memory (MiB) |",
           "|---|---|---:|---:|"]
    for r in results["train"]:
        if "error" in r:
            out.append(f"| {r['variant']} | - | error: {r['error'][:60]} | - |")
        else:
            out.append(f"| {r['variant']} | {r['compute_dtype']} | {r['step_s']:.2f} | {r['peak_bytes'] / 2**20:.0f} |")
    out += ["", "| greedy decode, batch 1 | compute | tokens/s | peak memory (MiB) |", "|---|---|---:|---:|"]
    for r in results["decode"]:
        if "error" in r:
            out.append(f"| {r['variant']} | - | error: {r['error'][:60]} | - |")
        else:
            out.append(f"| {r['variant']} | {r['compute_dtype']} | {r['tok_s']:.1f} | {r['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
