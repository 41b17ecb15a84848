"""The text trunk: logit parity with transformers on tiny random HF checkpoints, presets, RoPE details."""
import json
import math

import pytest
import torch

import herd
from herd.config import ModelConfig, RopeScaling, from_hf_config, preset
from herd.model import Transformer, rope_frequencies
from herd.sizes import count_params
from conftest import randomize_

transformers = pytest.importorskip("transformers")


def llama4_config(**kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                attention_chunk_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return transformers.Llama4TextConfig(**base)


def save_hf(tmp_path, hf_model, name):
    folder = tmp_path / name
    hf_model.save_pretrained(folder)
    return folder


def compare(tmp_path, hf_model, name, T=40, B=2, vocab=128):
    randomize_(hf_model)
    hf_model.eval()
    folder = save_hf(tmp_path, hf_model, name)
    model = herd.load(folder)
    ids = torch.randint(0, vocab, (B, T))
    with torch.no_grad():
        ref = hf_model(ids).logits.float()
        out = model(ids)
    assert out.shape == (B, T, vocab)
    return (out - ref).abs().max().item(), model, ids, ref


CASES = {
    # (a) Scout-like: every layer MoE, QK-norm, llama3 scaling (blend band exercised via factor 8 / 1 / 4)
    "scout": dict(use_qk_norm=True, interleave_moe_layer_step=1,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    # (b) Maverick-like: dense and MoE interleaved, no QK-norm, no RoPE scaling
    "maverick": dict(use_qk_norm=False, interleave_moe_layer_step=2, num_local_experts=8),
    # (c) several chunks long, floor_scale so small that temperature tuning scales q from position 3 on
    "temperature": dict(use_qk_norm=True, floor_scale=4, attn_scale=0.5, num_hidden_layers=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama4_parity(tmp_path, case):
    cfg = llama4_config(attn_implementation="eager", **CASES[case])
    hf_model = transformers.Llama4ForCausalLM(cfg)
    diff, model, ids, ref = compare(tmp_path, hf_model, case, T=40)
    assert diff <= 1e-4, f"{case}: max abs diff {diff}"
    assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"


def test_temperature_tuning_and_chunking_matter(tmp_path):
    """(c) is a real check: herd without temperature tuning, or without chunking, misses the reference."""
    cfg = llama4_config(attn_implementation="eager", **CASES["temperature"])
    hf_model = transformers.Llama4ForCausalLM(cfg)
    diff, model, ids, ref = compare(tmp_path, hf_model, "tt", T=40)
    assert diff <= 1e-4
    for change in ({"attn_temperature_tuning": False}, {"attn_chunk_size": None}):
        c = ModelConfig.from_dict({**model.config.to_dict(), **change})
        variant = Transformer(c)
        variant.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (variant(ids) - ref).abs().max() > 1e-2, change


def test_dense_llama_tied_parity(tmp_path):
    """(d) Llama 2/3-style dense model with tied embeddings: HF's rotate-half q/k rows are permuted at load."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32},
                                   attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(cfg)
    diff, model, _, _ = compare(tmp_path, hf_model, "llama", T=24)
    assert diff <= 1e-4
    assert model.output.weight is model.tok_embeddings.weight
    assert model.config.moe is None and all(s.uses_rope and not s.chunked for s in model.config.layers)


def test_sharded_checkpoint(tmp_path):
    cfg = llama4_config(attn_implementation="eager", interleave_moe_layer_step=2)
    hf_model = randomize_(transformers.Llama4ForCausalLM(cfg)).eval()
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = herd.load(tmp_path / "sharded")
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() <= 1e-4


def test_load_dtype(tmp_path):
    hf_model = transformers.Llama4ForCausalLM(llama4_config())
    folder = save_hf(tmp_path, randomize_(hf_model), "bf16")
    model = herd.load(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 128)


def test_config_reading_variants():
    """Classic rope_theta/rope_scaling keys (official checkpoints) and the nested multimodal config."""
    text = {"vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
            "rope_theta": 500000.0, "use_qk_norm": True, "attention_chunk_size": 8192,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "no_rope_layers": [1, 1, 1, 0] * 12, "eos_token_id": [200001, 200007, 200008]}
    cfg = from_hf_config({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                          "text_config": text, "vision_config": {"hidden_size": 1408}})
    assert cfg.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    assert [s.uses_rope for s in cfg.layers[:4]] == [True, True, True, False]
    assert all(s.is_moe for s in cfg.layers) and cfg.vision is not None
    assert cfg.layers[3].temperature_tuning and not cfg.layers[3].qk_norm and not cfg.layers[3].chunked
    assert cfg.layers[0].qk_norm and cfg.layers[0].chunked
    assert cfg.eos_token_ids == [200001, 200007, 200008]
    # Scout scaling has no blend band: frequencies 0..34 kept, 35..63 divided by 16 (spec 2.3)
    base = ModelConfig(rope_scaling=None)
    ratio = rope_frequencies(base) / rope_frequencies(cfg)
    assert torch.allclose(ratio[:35], torch.ones(35)) and torch.allclose(ratio[35:], torch.full((29,), 16.0))


def test_presets_scale():
    """The seeds' headline numbers, counted on the meta device: Scout 109B / 17B, Maverick 400B / 17B."""
    scout, maverick = count_params(preset("scout")), count_params(preset("maverick"))
    assert abs(scout.total / 109e9 - 1) < 0.02 and abs(scout.active / 17e9 - 1) < 0.02
    assert abs(maverick.total / 400e9 - 1) < 0.02 and abs(maverick.active / 17e9 - 1) < 0.02
    cfg = preset("maverick")
    assert [s.is_moe for s in cfg.layers[:4]] == [False, True, False, True]
    assert not any(s.qk_norm for s in cfg.layers)


def test_debug_preset_forward_backward():
    model = Transformer(preset("debug")).init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 50))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for n, p in model.named_parameters()), "every weight gets a gradient"
