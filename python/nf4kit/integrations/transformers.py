"""transformers checkpoints: load bitsandbytes-4bit checkpoints into nf4kit layers, and write
checkpoints that stock transformers + bitsandbytes load unchanged.

* `from_pretrained(path)`: a checkpoint directory whose ``config.json`` has
  ``quantization_config.quant_method == "bitsandbytes"`` (4-bit) is loaded without
  re-quantizing: the model is built on the meta device, every Linear with a
  ``<name>.weight.quant_state.bitsandbytes__nf4|fp4`` entry becomes an ``nf4kit.nn.Linear4bit``
  and takes the stored bytes and state as they are.  A float checkpoint is loaded by
  transformers and quantized by nf4kit (``quantize_model``), as ``load_in_4bit`` would.
* `save_quantized(model, out_dir)`: safetensors with bitsandbytes' keys + a ``config.json``
  whose ``quantization_config`` is transformers' ``BitsAndBytesConfig`` for those settings.
* `quantize_checkpoint(model_dir, out_dir)`: both, for ``nf4kit quantize MODEL OUT``.

transformers and safetensors are imported lazily (``import nf4kit`` stays light).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from typing import Any, Optional, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]
_QS_MARK = ".weight.quant_state.bitsandbytes__"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(d: Any) -> Optional[torch.dtype]:
    if d is None or isinstance(d, torch.dtype):
        return d
    s = str(d).replace("torch.", "")
    if s == "auto":
        return None
    if s not in _DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use float32, bfloat16 or float16")
    return _DTYPES[s]


# ---------------------------------------------------------------- reading
def read_state_dict(model_dir: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded with an index), on CPU."""
    from safetensors.torch import load_file

    d = pathlib.Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights found")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(d / f), device="cpu"))
    return sd


def bnb_quantization_config(model_dir: PathLike) -> Optional[dict]:
    """The checkpoint's 4-bit bitsandbytes quantization_config (a dict), or None."""
    cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        return None
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise ValueError(f"{model_dir}: a bitsandbytes 8-bit checkpoint; nf4kit reads 4-bit ones")
    return q


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _init_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (RoPE inv_freq...) are not in checkpoints: materialise those left
    on the meta device and let the model's own initialiser compute them."""
    owners = []
    for mod in model.modules():
        metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if metas:
            for n in metas:
                b = getattr(mod, n)
                mod.register_buffer(n, torch.empty_like(b, device="cpu"),
                                    persistent=n not in mod._non_persistent_buffers_set)
            owners.append(mod)
    init = getattr(model, "_init_weights", None)
    for mod in owners:
        own = {n: p.detach().clone() for n, p in mod.named_parameters(recurse=False)}
        if init is None:
            raise RuntimeError(f"cannot initialise the buffers of {type(mod).__name__}")
        with torch.no_grad():
            init(mod)
            for n, v in own.items():  # _init_weights may touch loaded parameters: put them back
                getattr(mod, n).copy_(v)


def from_pretrained(path: PathLike, model_class: Any = None, dtype: Any = None, compute_dtype: Any = None,
                    device: Union[str, torch.device] = "cpu", quantize: bool = True, blocksize: int = 64,
                    quant_type: str = "nf4", compress_statistics: bool = True, **hf_kwargs: Any) -> nn.Module:
    """Load a transformers model whose linear layers are nf4kit ``Linear4bit``.

    path: a local checkpoint directory (config.json + safetensors).
    A bitsandbytes 4-bit checkpoint loads as stored (no re-quantization; the packed bytes and
    quant states are those of the file).  A float checkpoint (no quantization_config) is
    loaded by transformers and, with quantize=True, quantized by nf4kit with `blocksize`,
    `quant_type`, `compress_statistics` (lm_head stays in full precision, as transformers does).
    model_class: transformers class (default: config.architectures[0], else AutoModelForCausalLM).
    dtype: dtype of the non-quantized parameters (default: as stored).
    compute_dtype: matmul dtype of the 4-bit layers (default: the checkpoint's
    bnb_4bit_compute_dtype, else `dtype`, else the input's dtype).
    Returns the model in eval mode on `device`.
    """
    import transformers

    from .. import nn as nf4nn

    path = pathlib.Path(path)
    dtype, compute_dtype = _dtype(dtype), _dtype(compute_dtype)
    qcfg = bnb_quantization_config(path)
    if qcfg is None:
        cls = _model_class(transformers.AutoConfig.from_pretrained(path), model_class)
        model = cls.from_pretrained(path, dtype=dtype or "auto", **hf_kwargs)
        if quantize:
            skip = _output_names(model)
            nf4nn.quantize_model(model, skip_modules=skip, compute_dtype=compute_dtype or dtype,
                                 blocksize=blocksize, quant_type=quant_type,
                                 compress_statistics=compress_statistics, progress=False)
        return model.to(device).eval()

    config = transformers.AutoConfig.from_pretrained(path, **hf_kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain model; the 4-bit layers are ours
    cls = _model_class(config, model_class)
    sd = read_state_dict(path)
    quantized = sorted({k.split(_QS_MARK)[0] for k in sd if _QS_MARK in k})
    if compute_dtype is None:
        compute_dtype = _dtype(qcfg.get("bnb_4bit_compute_dtype")) or dtype
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name}: quantized in the checkpoint but is a {type(lin).__name__} in the model")
        qt = json.loads(bytes(next(v for k, v in sd.items() if k.startswith(name + _QS_MARK)).tolist()))
        setattr(parent, child, nf4nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                                compute_dtype=compute_dtype, quant_type=qt["quant_type"],
                                                blocksize=qt["blocksize"],
                                                compress_statistics="nested_blocksize" in qt, device="meta"))
    result = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings",
                                                                False):
        model.tie_weights()
    _init_meta_buffers(model)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint has no values for {still_meta[:8]}"
                         f"{' ...' if len(still_meta) > 8 else ''}")
    unexpected = [k for k in result.unexpected_keys if "rotary_emb.inv_freq" not in k]
    if unexpected:
        raise ValueError(f"{path}: checkpoint entries the model does not have: {unexpected[:8]}")
    if dtype is not None:
        for mod in model.modules():
            for n, p in mod.named_parameters(recurse=False):
                if p.is_floating_point() and not (isinstance(mod, nf4nn.Linear4bit) and n == "weight"):
                    p.data = p.data.to(dtype)
    return model.to(device).eval()


# ---------------------------------------------------------------- writing
def _output_names(model: nn.Module) -> tuple[str, ...]:
    """Module names transformers' bitsandbytes quantizer keeps in full precision (the output
    embedding), so an nf4kit-written checkpoint has the layout stock transformers expects."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    names = tuple(n for n, m in model.named_modules() if out is not None and m is out)
    return names or ("lm_head",)


def _bnb_config_dict(quant_type: str, compress_statistics: bool, compute_dtype: torch.dtype,
                     skip: Optional[tuple[str, ...]] = None, quant_storage: torch.dtype = torch.uint8) -> dict:
    """transformers' BitsAndBytesConfig(load_in_4bit=True, ...).to_dict() for these settings."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    storage = {torch.uint8: "uint8", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float32: "float32", torch.int8: "int8"}
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": name[compute_dtype],
        "bnb_4bit_quant_storage": storage[quant_storage], "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(compress_statistics), "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": list(skip) if skip else None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def _write_safetensors(sd: dict[str, torch.Tensor], out_dir: pathlib.Path,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Single file, or shards + model.safetensors.index.json (transformers' layout)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        t = sd[k]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_quantized(model: nn.Module, out_dir: PathLike, source_dir: Optional[PathLike] = None) -> None:
    """Write `model` (nf4kit Linear4bit layers) as a bitsandbytes-4bit transformers checkpoint.

    Weights: safetensors with bitsandbytes' keys (``weight`` packed uint8, ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``); tied
    weights stored once.  config.json gets the BitsAndBytesConfig; tokenizer and generation
    files are copied from `source_dir` when given.
    """
    from .. import nn as nf4nn

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = [m for m in model.modules() if isinstance(m, nf4nn.Linear4bit)]
    if not layers:
        raise ValueError("save_quantized: the model has no nf4kit Linear4bit layers")
    first = layers[0]
    if any(isinstance(m, nn.Module) and type(m).__name__ == "FusedLoraLinear4bit" for m in model.modules()):
        raise ValueError("save_quantized: merge or unload the LoRA adapters first (or save them with PEFT)")
    sd, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen and not k.endswith(("quant_map", "nested_quant_map")):
            continue  # a tied weight (lm_head = embed_tokens): stored once, as transformers does
        if key is not None:
            seen.setdefault(key, k)
        sd[k] = v.detach().to("cpu").contiguous().clone()
    _write_safetensors(sd, out)
    cfg = model.config.to_dict()
    skip = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and not isinstance(m, nf4nn.Linear4bit) and n)
    cdt = first.compute_dtype or first.quant_state.dtype
    cfg["quantization_config"] = _bnb_config_dict(first.quant_type, first.compress_statistics, cdt,
                                                  skip or None, first.weight.dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if source_dir is not None:
        for p in pathlib.Path(source_dir).iterdir():
            if p.is_file() and p.name != "config.json" and not p.name.endswith(_WEIGHT_FILES) \
                    and not p.name.endswith(".index.json"):
                shutil.copy2(p, out / p.name)


def quantize_checkpoint(model_dir: PathLike, out_dir: PathLike, blocksize: int = 64, quant_type: str = "nf4",
                        compress_statistics: bool = True, compute_dtype: Any = "bfloat16", dtype: Any = None,
                        model_class: Any = None) -> pathlib.Path:
    """`nf4kit quantize MODEL OUT`: quantize a float transformers checkpoint with nf4kit and write
    a bitsandbytes-4bit checkpoint (loadable by stock transformers + bitsandbytes and by
    `from_pretrained`).  Every nn.Linear except the output embedding is quantized."""
    model = from_pretrained(model_dir, model_class=model_class, dtype=dtype, compute_dtype=compute_dtype,
                            quantize=True, blocksize=blocksize, quant_type=quant_type,
                            compress_statistics=compress_statistics)
    save_quantized(model, out_dir, source_dir=model_dir)
    return pathlib.Path(out_dir)


# ---------------------------------------------------------------- CLI hook
def add_cli(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Adds ``quantize MODEL OUT`` to an argparse subparsers object; the parsed args carry
    ``func`` (call it with the namespace)."""
    p = subparsers.add_parser("quantize", help="write a bitsandbytes-4bit checkpoint of a transformers model")
    p.add_argument("model", help="float checkpoint directory (config.json + safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--no-double-quant", action="store_true", help="keep fp32 block absmax")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the non-quantized weights (default: as stored)")

    def run(args: argparse.Namespace) -> int:
        out = quantize_checkpoint(args.model, args.out, blocksize=args.blocksize, quant_type=args.quant_type,
                                  compress_statistics=not args.no_double_quant, compute_dtype=args.compute_dtype,
                                  dtype=args.dtype)
        print(f"nf4kit: wrote {out}")
        return 0

    p.set_defaults(func=run)
    return p
