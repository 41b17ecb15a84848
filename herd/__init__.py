"""herd: run, serve, quantize, train and distill Llama-4-architecture models on one readable codebase."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu", progress=False, quant=None, prepare=False):
    """Load a model: an HF checkpoint folder (config.json + safetensors, float or `herd quantize`d) or a GGUF file.
    Every loader returns the same kind of plain model: a torch module with `.config`; calling it on input_ids (B, T)
    returns logits (B, T, vocab).

    dtype: torch dtype for floating-point weights (None keeps the stored dtype; GGUF dequantizes to float32).
    progress: show a progress bar while reading tensors.
    quant: "packed" (GGUF files only) keeps Q4_0 / Q4_1 / Q8_0 weights packed in quantize.py's int4 / int8 modules
        instead of dequantizing them (herd/gguf.py).
    prepare: apply herd.cpu.prepare to the loaded model (fused matmuls, herd's kernels, C++ decode steps).
    """
    from .gguf import GGUFError, is_gguf, load_gguf
    if is_gguf(path):
        if quant not in (None, "packed"):
            raise GGUFError(f"{path}: unknown quant {quant!r}; expected None or 'packed'")
        model = load_gguf(path, dtype=dtype, device=device, progress=progress, packed=quant == "packed")
    elif quant is not None:
        raise ValueError(f"quant={quant!r} applies to GGUF files only; {path} is not one")
    else:
        from .checkpoint import load_hf
        model = load_hf(Path(path), dtype=dtype, device=device, progress=progress)
    if prepare:
        from .cpu import prepare as prepare_model
        prepare_model(model)
    return model
