"""herd: run, serve, quantize, train and distill Llama-4-architecture models on one readable codebase."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu", progress=False, quant=None, prepare=False, mmap_experts=None):
    """Load a model: an HF checkpoint folder (config.json + safetensors, float or `herd quantize`d) or a GGUF file.
    Every loader returns the same kind of plain model: a torch module with `.config`; calling it on input_ids (B, T)
    returns logits (B, T, vocab).

    dtype: torch dtype for floating-point weights (None keeps the stored dtype; GGUF dequantizes to float32).
    progress: show a progress bar while reading tensors.
    quant: "packed" (GGUF files only) keeps Q4_0 / Q4_1 / Q8_0 weights packed in quantize.py's int4 / int8 modules
        instead of dequantizing them (herd/gguf.py).
    prepare: apply herd.cpu.prepare to the loaded model (fused matmuls, herd's kernels, C++ decode steps, 2 MB pages).
    mmap_experts (with quant="packed"): True leaves the routed experts in the file, mapped (gguf.GGUFExperts: pages
        the OS can drop and re-read, so a model larger than memory runs); False copies them into memory; None (the
        default) maps them only where they would not fit, i.e. the in-memory load's peak (~3x their bytes) exceeds
        the memory this process may still take (gguf.experts_exceed_memory: MemAvailable, or a cgroup's limit minus
        its usage).
    """
    from .gguf import GGUFError, experts_exceed_memory, is_gguf, load_gguf
    if is_gguf(path):
        if quant not in (None, "packed"):
            raise GGUFError(f"{path}: unknown quant {quant!r}; expected None or 'packed'")
        if mmap_experts and quant != "packed":
            raise GGUFError(f"{path}: mmap_experts=True maps packed GGUF blocks; it needs quant='packed'")
        if mmap_experts is None:
            mmap_experts = quant == "packed" and experts_exceed_memory(path)
        # A Q8_0 token embedding (and the head tied to it) is re-quantized per row to int8 only where the model
        # will run on herd's kernels (int16 activations). torch's int4 kernel takes bf16 activations; that rounding
        # plus the per-row int8 head tipped greedy decoding of the default model into garbage ("L'Étoile, la
        # Marseillaise..." for the capital of France; either alone answers "Paris"), so elsewhere the embedding
        # and head stay fp32, exactly the Q8_0 values (+81 MiB for SmolLM2; perplexity in bench/perplexity.py).
        int8_embeddings = prepare and _herd_kernels_run()
        model = load_gguf(path, dtype=dtype, device=device, progress=progress, packed=quant == "packed",
                          int8_embeddings=int8_embeddings, mmap_experts=mmap_experts)
    elif quant is not None or mmap_experts:
        what = f"quant={quant!r}" if quant is not None else "mmap_experts=True"
        raise ValueError(f"{what} applies to GGUF files only; {path} is not one")
    else:
        from .checkpoint import load_hf
        model = load_hf(Path(path), dtype=dtype, device=device, progress=progress)
    if prepare:
        from .cpu import prepare as prepare_model
        from .gguf import _release_freed_memory
        prepare_model(model)
        _release_freed_memory()     # the replaced modules' heap (0.5 GB of a 2-layer Scout-width GGUF's 1.1 GB)
    return model


def _herd_kernels_run() -> bool:
    """Whether herd.cpu.prepare will put the model on herd's C++ kernels on this machine."""
    from .cpu import extension
    return extension.available()
