"""A deterministic instruction dataset with checkable answers, for `nf4kit finetune` / `eval`.

Each example is a short instruction with one right answer (arithmetic, unit conversion, parity,
comparison, sorting, letter reversal, ...).  ``make_splits(seed)`` gives the same train and
held-out lists on every machine (Python's ``random.Random`` with a fixed seed, no global state),
and no held-out prompt appears in the training split.

``encode_example`` renders an example with the tokenizer's chat template (system + user +
assistant) and returns token ids with labels only on the answer (and the end-of-turn token), so
the loss — and the exact-match check — is on the answer alone.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

SYSTEM_PROMPT = "Reply with the answer only."

# Short, common words: their letters tokenise one by one when spaced out.
_WORDS = (
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "milk", "rain", "star", "moon", "lamp", "door",
    "ship", "frog", "cake", "road", "wind", "salt", "gold", "iron", "leaf", "rock", "snow", "king", "bell",
    "corn", "drum", "fire", "hill", "jar", "kite", "lion", "nest", "owl", "pear", "ring", "sock", "tent",
    "vase", "wolf", "yarn", "zoo", "apple", "bread", "chair", "house", "water", "plant", "light", "smile",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Example:
    """One instruction: task name, user prompt, the exact expected answer."""

    task: str
    prompt: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _sub(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(20, 99), r.randint(1, 19)
    return f"What is {a} - {b}?", str(a - b)


def _mul(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", str(a * b)


_UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
          ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("days", "hours", 24), ("feet", "inches", 12))


def _convert(r: random.Random) -> tuple[str, str]:
    src, dst, f = r.choice(_UNITS)
    n = r.randint(2, 30)
    return f"Convert {n} {src} to {dst}.", str(n * f)


def _parity(r: random.Random) -> tuple[str, str]:
    n = r.randint(10, 999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _larger(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(range(10, 1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _max_list(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 100), r.randint(4, 6))
    return f"What is the largest number in {', '.join(map(str, xs))}?", str(max(xs))


def _sort(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 10), r.randint(3, 5))
    return f"Sort these digits in ascending order: {' '.join(map(str, xs))}", " ".join(map(str, sorted(xs)))


def _reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    return f"Reverse the letters: {' '.join(w)}", " ".join(reversed(w))


def _next_letter(r: random.Random) -> tuple[str, str]:
    i = r.randint(0, 24)
    return f"Which letter comes right after {_LETTERS[i]} in the alphabet?", _LETTERS[i + 1]


def _count_words(r: random.Random) -> tuple[str, str]:
    ws = r.sample(_WORDS, r.randint(2, 7))
    return f"How many words are in this list: {' '.join(ws)}?", str(len(ws))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "subtract": _sub, "multiply": _mul, "convert_units": _convert, "parity": _parity,
    "larger": _larger, "max_of_list": _max_list, "sort_digits": _sort, "reverse_letters": _reverse,
    "next_letter": _next_letter, "count_words": _count_words,
}


def make_splits(n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                tasks: Optional[Sequence[str]] = None) -> tuple[list[Example], list[Example]]:
    """(train, held_out): tasks in round-robin order, held-out prompts never in train.

    Deterministic for a given (n_train, n_eval, seed, tasks).  Small tasks may repeat a prompt
    inside the training split (e.g. there are only 25 "next letter" questions).
    """
    names = list(tasks) if tasks else list(TASKS)
    for t in names:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    r_eval = random.Random(f"nf4kit-eval-{seed}")
    held: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(held) < n_eval and tries < 100 * max(n_eval, 1):
        t = names[len(held) % len(names)]
        p, a = TASKS[t](r_eval)
        tries += 1
        if p in seen:
            continue
        seen.add(p)
        held.append(Example(t, p, a))
    r_train = random.Random(f"nf4kit-train-{seed}")
    train: list[Example] = []
    tries = 0
    while len(train) < n_train and tries < 1000 * max(n_train, 1):
        t = names[len(train) % len(names)]
        p, a = TASKS[t](r_train)
        tries += 1
        if p in seen:  # keep the held-out set unseen
            continue
        train.append(Example(t, p, a))
    r_train.shuffle(train)
    return train, held


# ---------------------------------------------------------------------- tokenisation
def _end_token_ids(tokenizer: Any) -> list[int]:
    ids = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def encode_example(tokenizer: Any, ex: Example, system_prompt: Optional[str] = SYSTEM_PROMPT) -> dict[str, list[int]]:
    """Token ids of the whole conversation and of the prompt.

    Returns {"input_ids": [...], "labels": [...] (-100 on the prompt), "prompt_len": [n]}.
    The labelled part is the answer followed by the end-of-turn token, nothing after it.
    """
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": ex.prompt}]
    if getattr(tokenizer, "chat_template", None):
        prompt = _ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex.answer}],
                                                  tokenize=True))
        if full[:len(prompt)] != prompt:  # a template that rewrites the prompt: fall back to concatenation
            full = prompt + _ids(tokenizer(ex.answer, add_special_tokens=False))
        answer = full[len(prompt):]
        ends = set(_end_token_ids(tokenizer))
        cut = next((i for i, t in enumerate(answer) if t in ends), None)
        if cut is None:
            answer = answer + _end_token_ids(tokenizer)[:1]
        else:
            answer = answer[:cut + 1]
    else:  # a base model without a chat template
        text = (f"{system_prompt}\n" if system_prompt else "") + f"Question: {ex.prompt}\nAnswer: "
        prompt = _ids(tokenizer(text))
        answer = _ids(tokenizer(ex.answer, add_special_tokens=False)) + _end_token_ids(tokenizer)[:1]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "prompt_len": [len(prompt)]}


def prompt_text(tokenizer: Any, ex: Example, system_prompt: Optional[str] = SYSTEM_PROMPT) -> list[int]:
    """Prompt token ids only (for generation)."""
    enc = encode_example(tokenizer, ex, system_prompt)
    return enc["input_ids"][:enc["prompt_len"][0]]
