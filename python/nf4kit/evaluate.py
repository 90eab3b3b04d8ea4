"""`nf4kit eval`: the QLoRA paper's data-type comparison, reproduced on a real model.

For the 16-bit model and for every linear weight (lm_head excepted) stored as int8 absmax (per
tensor and block-wise), int4 absmax, FP4, NF4 and NF4 + double quant: perplexity on held-out
text (the held-out instruction conversations and a short built-in prose passage), relative weight
reconstruction error and bits per parameter.  Then held-out exact-match accuracy after the same
tuning for LoRA on the 16-bit base (PEFT) and QLoRA on the NF4 base (nf4kit).

The 4-bit weights are simulated (quantize, then dequantize back into the float model) so that
every scheme runs through the same float forward: the comparison is about the data types, not
the kernels.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import time
from typing import Any, Callable

import torch
from torch import nn

from . import functional as F4
from .data.tasks import encode_example, make_splits
from .finetune import (LoraConfig, answer_loss, collate, exact_match, load_model, pick_device, pick_dtype,
                       quantize_model, set_threads, train_lora, _targets)

# My own prose (no external corpus needed offline): everyday English for a second perplexity.
PROSE = (
    "The library opens at nine in the morning and closes at six in the evening. On Saturdays it closes "
    "earlier, at two, so that the staff can sort the books that were returned during the week. Most "
    "visitors come to borrow novels, but a growing number use the reading room to study or to work on "
    "their laptops, because the building is quiet and the chairs are comfortable.\n\n"
    "To make a simple tomato soup, soften a chopped onion in olive oil, add two cloves of garlic and a tin "
    "of tomatoes, and let everything simmer for twenty minutes. Blend the soup until it is smooth, season it "
    "with salt and pepper, and serve it with a slice of warm bread.\n\n"
    "A bicycle is one of the most efficient machines ever built. A rider can travel three or four times "
    "faster than on foot while using about the same amount of energy. Keeping the chain clean and the tyres "
    "properly inflated makes the ride easier and helps the parts last longer.\n\n"
    "Rain fell for most of the afternoon, and the river rose slowly until it reached the bottom step of the "
    "old stone bridge. Children watched from the windows as the water carried leaves and small branches "
    "toward the sea, and their parents wondered whether the road to the village would stay open.\n\n"
    "When you move to a new city, the first weeks are often the hardest. You do not yet know where to buy "
    "groceries, which bus goes to the centre, or how long it takes to walk to work. After a month, though, "
    "the streets begin to feel familiar, and small habits, like a favourite bakery or a quiet park bench, "
    "make the place feel like home.\n\n"
    "Plants need light, water and air to grow. Leaves capture sunlight and turn it into sugar, while the "
    "roots take up water and minerals from the soil. If a plant gets too little light, its stems grow long "
    "and thin as it reaches for the sun; if it gets too much water, its roots can rot.\n\n"
    "The meeting started ten minutes late because the projector would not connect to the laptop. Once it "
    "worked, the team reviewed the results of the last quarter, agreed on three priorities for the next "
    "one, and decided to meet again in two weeks to check their progress.\n\n"
    "Learning a musical instrument takes patience. At first, even simple songs sound clumsy, and the "
    "fingers seem to move in the wrong order. Practising a little every day works better than practising "
    "for hours once a week, because the brain needs time between sessions to store what it has learned."
)


# ---------------------------------------------------------------------- weight schemes
def _int4_absmax(W: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Textbook symmetric int4: q = round(7/absmax · x) in [-7, 7], per block of `blocksize`."""
    flat = W.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
    q = torch.round(blocks / scale).clamp(-7, 7)
    return (q * scale).reshape(-1)[:n].view(W.shape).to(W.dtype)


def _4bit(quant_type: str, dq: bool, blocksize: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(W: torch.Tensor) -> torch.Tensor:
        packed, qs = F4.quantize_4bit(W.contiguous(), blocksize=blocksize, compress_statistics=dq,
                                      quant_type=quant_type)
        return F4.dequantize_4bit(packed, qs)
    return f


def _int8(blocksize):
    def f(W: torch.Tensor) -> torch.Tensor:
        q, s = F4.quantize_absmax_int8(W, blocksize=blocksize)
        return F4.dequantize_absmax_int8(q, s, blocksize=blocksize, dtype=W.dtype)
    return f


def schemes(blocksize: int = 64) -> list[tuple[str, Callable, Callable[[int], float]]]:
    """(name, weight -> simulated weight, numel -> bits per parameter)."""
    b = blocksize
    return [
        ("16-bit (bf16)", lambda W: W.to(torch.bfloat16).to(W.dtype), lambda n: 16.0),
        ("int8 absmax, per tensor", _int8(None), lambda n: 8 + 32 / n),
        (f"int8 absmax, blocks of {b}", _int8(b), lambda n: 8 + 32 / b),
        (f"int4 absmax, blocks of {b}", lambda W: _int4_absmax(W, b), lambda n: 4 + 32 / b),
        (f"FP4, blocks of {b}", _4bit("fp4", False, b), lambda n: 4 + 32 / b),
        (f"NF4, blocks of {b}", _4bit("nf4", False, b), lambda n: 4 + 32 / b),
        ("NF4 + double quant", _4bit("nf4", True, b), lambda n: 4 + 8 / b + 32 / (256 * b)),
    ]


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """exp(mean token NLL) over the labelled tokens of `batches`."""
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        lg = logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        loss = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                           reduction="sum")
        nll += float(loss)
        n += int((tgt != -100).sum())
    return math.exp(nll / max(n, 1))


def _text_batches(tok: Any, held: list, n: int, batch_size: int, device) -> tuple[list, list]:
    convs = []
    for ex in held[:n]:
        e = encode_example(tok, ex)
        convs.append({"input_ids": e["input_ids"], "labels": list(e["input_ids"])})  # every token
    conv_b = [collate(convs[i:i + batch_size], tok.pad_token_id, None, device) for i in range(0, len(convs), batch_size)]
    ids = tok(PROSE, add_special_tokens=False)["input_ids"]
    chunk = 128
    prose = [{"input_ids": ids[i:i + chunk], "labels": ids[i:i + chunk]} for i in range(0, len(ids), chunk)
             if len(ids[i:i + chunk]) > 8]
    prose_b = [collate(prose, tok.pad_token_id, None, device)]
    return conv_b, prose_b


def compare_datatypes(model: nn.Module, tok: Any, held: list, n_ppl: int, batch_size: int, device,
                      blocksize: int = 64, log: Any = print) -> list[dict[str, Any]]:
    """Per scheme: perplexities, relative reconstruction error, bits/param (model restored after)."""
    conv_b, prose_b = _text_batches(tok, held, n_ppl, batch_size, device)
    lins = target_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in lins}
    rows = []
    for name, fn, bits in schemes(blocksize):
        t0 = time.perf_counter()
        err2 = ref2 = 0.0
        nbits = nparams = 0.0
        with torch.no_grad():
            for n, m in lins:
                W = originals[n]
                Wq = fn(W.float()).to(W.dtype)
                err2 += float((Wq.double() - W.double()).pow(2).sum())
                ref2 += float(W.double().pow(2).sum())
                nbits += bits(W.numel()) * W.numel()
                nparams += W.numel()
                m.weight.copy_(Wq)
        row = {"scheme": name, "bits_per_param": nbits / nparams, "rel_weight_error": math.sqrt(err2 / ref2),
               "ppl_heldout": perplexity(model, conv_b), "ppl_prose": perplexity(model, prose_b)}
        rows.append(row)
        log(f"  {name:<28} ppl prose {row['ppl_prose']:.2f} / tasks {row['ppl_heldout']:.3f}   weight error "
            f"{row['rel_weight_error']:.4f}   {row['bits_per_param']:.3f} bits  ({time.perf_counter() - t0:.0f} s)")
    with torch.no_grad():
        for n, m in lins:
            m.weight.copy_(originals[n])
    return rows


def _lora_on_float(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT LoRA on the unquantized base, same r / alpha / targets, base frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    tm = _targets(args.target_modules)
    if tm == "all-linear":  # inject_adapter_in_model wants names: every linear but lm_head
        tm = sorted({n.split(".")[-1] for n, _ in target_linears(model)})
    cfg = PeftLoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora,
                         target_modules=tm, bias="none")
    model = inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def tune_compare(args: argparse.Namespace, device, cdt, log: Any = print) -> dict[str, Any]:
    """Held-out accuracy after identical tuning: LoRA on the 16-bit base vs QLoRA on NF4."""
    out: dict[str, Any] = {}
    for label in ("LoRA, 16-bit base", "QLoRA, NF4 + DQ base"):
        model, tok, _ = load_model(args.model, log)
        model.to(device=device, dtype=cdt)
        train, held = make_splits(args.train_size, args.eval_size, seed=args.seed)
        tr_encs = [encode_example(tok, e) for e in train]
        held_encs = [encode_example(tok, e) for e in held]
        torch.manual_seed(args.seed)
        if label.startswith("QLoRA"):
            quantize_model(model, target_modules=_targets(args.target_modules), lora=LoraConfig(
                r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora),
                compute_dtype=cdt, blocksize=args.blocksize, progress=False)
        else:
            model = _lora_on_float(model, args)
        before = exact_match(model, tok, held, args.eval_batch_size, device, args.seq_len, held_encs)
        tr = train_lora(model, tr_encs, tok.pad_token_id, args.steps, args.batch_size, args.lr, args.seq_len,
                        device, seed=args.seed, progress=not args.quiet, desc=f"nf4kit: {label}")
        after = exact_match(model, tok, held, args.eval_batch_size, device, args.seq_len, held_encs)
        out[label] = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                      "loss_last10": sum(tr["losses"][-10:]) / len(tr["losses"][-10:]),
                      "train_seconds": tr["seconds"], "losses": tr["losses"]}
        log(f"  {label:<22} accuracy {100 * before['accuracy']:.1f} % -> {100 * after['accuracy']:.1f} %  "
            f"(final loss {out[label]['loss_last10']:.3f}, {tr['seconds']:.0f} s)")
        del model
    return out


def markdown(rows: list[dict[str, Any]], tune: dict[str, Any] | None) -> str:
    lines = ["| weights | bits/param | rel. weight error | ppl prose | ppl held-out task conversations |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['bits_per_param']:.3f} | {r['rel_weight_error']:.4f} | "
                     f"{r['ppl_prose']:.2f} | {r['ppl_heldout']:.3f} |")
    if tune:
        lines += ["", "| tuning (same steps, r, lr) | held-out accuracy before | after |", "|---|---:|---:|"]
        for k, v in tune.items():
            lines.append(f"| {k} | {100 * v['accuracy_before']:.1f} % | {100 * v['accuracy_after']:.1f} % |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["scheme"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    base = rows[0]["ppl_prose"]
    axes[0].barh(names, [r["ppl_prose"] for r in rows], color=["#888"] + ["#4c72b0"] * (len(rows) - 1))
    axes[0].axvline(base, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("perplexity on prose (lower is better)")
    axes[0].invert_yaxis()
    for r in rows:
        axes[1].scatter(r["bits_per_param"], r["rel_weight_error"], s=40)
        axes[1].annotate(r["scheme"], (r["bits_per_param"], r["rel_weight_error"]), fontsize=7,
                         xytext=(4, 2), textcoords="offset points")
    axes[1].set_xlabel("bits per parameter")
    axes[1].set_ylabel("relative weight reconstruction error")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    axes[1].grid(alpha=0.3)
    fig.suptitle("Weight data types on the real model (lm_head kept)")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return True


def run_eval(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    set_threads(getattr(args, "threads", 0), log)
    device = pick_device(args.device)
    cdt = pick_dtype(args.dtype, device)
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, path = load_model(args.model, log)  # fp32: the data types are compared in full precision
    model.to(device)
    _, held = make_splits(args.train_size, args.eval_size, seed=args.seed)
    log(f"model: {path}; perplexity on {min(args.ppl_examples, len(held))} held-out conversations and "
        f"{len(PROSE.split())} words of prose")
    rows = compare_datatypes(model, tok, held, args.ppl_examples, args.eval_batch_size, device, args.blocksize,
                             log)
    del model
    tune = None
    if not args.no_tune:
        log(f"tuning both for {args.steps} steps (r={args.r}, lr={args.lr}) ...")
        tune = tune_compare(args, device, cdt, log)
    table = markdown(rows, tune)
    print(table, flush=True)
    res = {"model": str(path), "rows": rows, "tuning": tune, "markdown": table}
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2))
    (out_dir / "eval.md").write_text(table + "\n")
    if plot(rows, out_dir / "datatypes.png"):
        log(f"wrote {out_dir / 'eval.json'}, {out_dir / 'eval.md'}, {out_dir / 'datatypes.png'}")
    return res
