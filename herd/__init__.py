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
        # A Q8_0 token embedding (and the head tied to it) is re-quantized per row to int8 only where the model
        # will run on herd's kernels (int16 activations). torch's int4 kernel takes bf16 activations; that rounding
        # plus the per-row int8 head tipped greedy decoding of the default model into garbage ("L'Étoile, la
        # Marseillaise..." for the capital of France; either alone answers "Paris"), so elsewhere the embedding
        # and head stay fp32, exactly the Q8_0 values (+81 MiB for SmolLM2; perplexity in bench/perplexity.py).
        int8_embeddings = prepare and _herd_kernels_run()
        model = load_gguf(path, dtype=dtype, device=device, progress=progress, packed=quant == "packed",
                          int8_embeddings=int8_embeddings)
    elif quant is not None:
        raise ValueError(f"quant={quant!r} applies to GGUF files only; {path} is not one")
    else:
        from .checkpoint import load_hf
        model = load_hf(Path(path), dtype=dtype, device=device, progress=progress)
    if prepare:
        from .cpu import prepare as prepare_model
        prepare_model(model)
    return model


def _herd_kernels_run() -> bool:
    """Whether herd.cpu.prepare will put the model on herd's C++ kernels on this machine."""
    from .cpu import extension
    return extension.available()
