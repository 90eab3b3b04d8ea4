"""`nf4kit memory`: what fine-tuning a model of P parameters holds in memory — full fine-tuning
vs LoRA on a 16-bit base vs QLoRA on an NF4 base — split into weights, gradients, optimizer
states and adapters (activations excluded: they depend on batch and sequence length).

The textbook case: full fine-tuning with mixed-precision AdamW keeps 16-bit weights (2 B) and
gradients (2 B), an fp32 master copy (4 B) and two fp32 Adam moments (8 B): 16 bytes a
parameter, so 10 B parameters need 160 GB.  Every number here is that arithmetic, made exact
and configurable.  GB = 10^9 bytes.
"""
from __future__ import annotations

from typing import Any, Optional

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# optimizer state bytes per trainable parameter
OPTIMIZER_BYTES = {
    "adamw": 8.0,                       # two fp32 moments
    "adamw8bit": 2.0 + 2 * 4 / 256,     # two 8-bit moments + an fp32 absmax per 256-block each
    "sgdm": 4.0,                        # fp32 momentum
    "sgd": 0.0,
}
LORA_SHAPE_FACTOR = 1.58  # Llama-shaped blocks: LoRA adds r·(in+out) per layer = 1.58·r/d of its parameters


def bits_per_param_4bit(blocksize: int = 64, double_quant: bool = True) -> float:
    """Stored bits per weight of NF4/FP4: 4 + the block constants.

    No double quant: an fp32 absmax per block (32/blocksize).  Double quant: a uint8 absmax
    per block plus an fp32 scale per 256 blocks (8/blocksize + 32/(256·blocksize)).
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (256 * blocksize)
    return 4 + 32 / blocksize


def estimate_hidden(params: float) -> int:
    """Hidden size of a Llama-shaped model of `params` parameters: 12·d² per block, d/128 blocks."""
    d = (params * 128 / 12) ** (1 / 3)
    return max(128, int(round(d / 128)) * 128)


def estimate(params: float = 10e9, r: int = 16, target_share: float = 0.9, hidden: Optional[int] = None,
             weight_dtype: str = "bf16", optimizer: str = "adamw", master_weights: bool = True,
             blocksize: int = 64, double_quant: bool = True, lora_dtype: str = "fp32") -> dict[str, Any]:
    """Bytes of full fine-tuning, LoRA and QLoRA, by component.

    params: model parameters.  target_share: fraction of them in the adapted linear layers
    (the rest — embeddings, norms, lm_head — stays in `weight_dtype`).  hidden: d (estimated
    from params if None), sets the adapter size ≈ 1.58·r/d of the target parameters.
    """
    if params <= 0:
        raise ValueError("--params must be positive")
    if not 0 < target_share <= 1:
        raise ValueError("--target-share must be in (0, 1]")
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}")
    wb = DTYPE_BYTES[weight_dtype]
    ob = OPTIMIZER_BYTES[optimizer]
    d = hidden or estimate_hidden(params)
    target = params * target_share
    lora_params = target * LORA_SHAPE_FACTOR * r / d
    lb = DTYPE_BYTES[lora_dtype]
    master = 4 if (master_weights and wb < 4) else 0

    full = {"weights": params * wb, "gradients": params * wb, "optimizer": params * (ob + master), "adapters": 0.0}
    adapters = lora_params * lb
    adapter_grads = lora_params * lb
    adapter_opt = lora_params * ob
    lora = {"weights": params * wb, "gradients": adapter_grads, "optimizer": adapter_opt, "adapters": adapters}
    bpp = bits_per_param_4bit(blocksize, double_quant)
    qlora = {"weights": target * bpp / 8 + (params - target) * wb, "gradients": adapter_grads,
             "optimizer": adapter_opt, "adapters": adapters}
    rows = {"full fine-tuning": full, "LoRA (16-bit base)": lora, "QLoRA (NF4 base)": qlora}
    for row in rows.values():
        row["total"] = sum(row.values())
    return {
        "params": params, "hidden": d, "r": r, "target_share": target_share, "lora_params": lora_params,
        "weight_dtype": weight_dtype, "optimizer": optimizer, "master_weights": bool(master),
        "bits_per_param_4bit": bpp, "double_quant": double_quant, "blocksize": blocksize,
        "bytes_per_param_full": (full["total"] / params), "rows": rows,
    }


def format_table(est: dict[str, Any]) -> str:
    """Markdown table of `estimate`'s rows in GB (10^9 bytes)."""
    cols = ("weights", "gradients", "optimizer", "adapters", "total")
    lines = [
        f"Fine-tuning memory for {est['params'] / 1e9:g} B parameters (d = {est['hidden']}, LoRA r = {est['r']} on "
        f"{100 * est['target_share']:.0f} % of the parameters = {est['lora_params'] / 1e6:.1f} M adapter parameters; "
        f"{est['weight_dtype']} weights, {est['optimizer']}"
        f"{' + fp32 master weights' if est['master_weights'] else ''}; NF4 at {est['bits_per_param_4bit']:.3f} "
        f"bits/param{' with double quant' if est['double_quant'] else ''}; activations not included)",
        "",
        "| method | " + " | ".join(f"{c} (GB)" for c in cols) + " | bytes/param |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, row in est["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c] / 1e9:,.2f}" for c in cols)
                     + f" | {row['total'] / est['params']:.2f} |")
    return "\n".join(lines)
