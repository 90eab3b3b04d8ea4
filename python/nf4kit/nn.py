"""Drop-in layers (Linear4bit, LoRALinear4bit, quantize_model): see issue 7."""
