"""herd: run, serve, quantize, train and distill Llama-4-architecture models on one readable codebase."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu", progress=False, quant=None):
    """Load a model: an HF checkpoint folder (config.json + safetensors) or a GGUF file. Returns a torch module
    with `.config`; calling it on input_ids (B, T) returns logits (B, T, vocab).

    dtype: torch dtype for floating-point weights (None keeps the stored dtype; GGUF dequantizes to float32).
    progress: show a progress bar while reading tensors.
    quant: "packed" (GGUF files only) keeps Q4_0 / Q4_1 / Q8_0 weights packed for torch's int4 / int8 CPU kernels
        instead of dequantizing them (herd/gguf_packed.py), with q/k/v and gate/up fused.
    """
    from .gguf_loader import is_gguf, load_gguf
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, device=device, progress=progress, quant=quant)
    if quant is not None:
        raise ValueError(f"quant={quant!r} applies to GGUF files only; {path} is not one")
    from .checkpoint import load_hf
    return load_hf(Path(path), dtype=dtype, device=device, progress=progress)
