"""herd: run, serve, quantize, train and distill Llama-4-architecture models on one readable codebase."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu", progress=False):
    """Load a model: an HF checkpoint folder (config.json + safetensors) or a GGUF file. Returns a torch module
    with `.config`; calling it on input_ids (B, T) returns logits (B, T, vocab).

    dtype: torch dtype for floating-point weights (None keeps the stored dtype; GGUF dequantizes to float32).
    progress: show a progress bar while reading tensors.
    """
    from .gguf_loader import is_gguf, load_gguf
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, device=device, progress=progress)
    from .checkpoint import load_hf
    return load_hf(Path(path), dtype=dtype, device=device, progress=progress)
