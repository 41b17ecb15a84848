"""Checkpoint reading: bad input gives clear errors; saving round-trips; nothing is unpickled."""
import json

import pytest
import torch
from safetensors.torch import save_file

import herd
from herd.checkpoint import CheckpointError, save_hf, to_hf_state_dict
from herd.config import ConfigError, preset
from herd.model import Transformer


def debug_model(**changes):
    cfg = preset("debug")
    for k, v in changes.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    return Transformer(cfg).init_weights(std=0.2, seed=1)


def test_round_trip_llama4(tmp_path):
    model = debug_model()
    save_hf(model, tmp_path / "ck")
    back = herd.load(tmp_path / "ck")
    ids = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_round_trip_dense_llama_tied(tmp_path):
    cfg = preset("debug")
    cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
    cfg.attn_temperature_tuning, cfg.tie_embeddings, cfg.source = False, True, "llama"
    cfg.__post_init__()
    model = Transformer(cfg).init_weights(std=0.2, seed=1)
    save_hf(model, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = herd.load(tmp_path / "dense")
    ids = torch.randint(0, 512, (1, 30))
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        herd.load(tmp_path)
    save_hf(debug_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        herd.load(tmp_path / "ck")


def test_refuses_pickle(tmp_path):
    save_hf(debug_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").rename(tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        herd.load(tmp_path / "ck")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                      "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="MistralForCausalLM.*not supported"):
        herd.load(tmp_path)


def test_misshaped_and_missing_tensor(tmp_path):
    model = debug_model()
    save_hf(model, tmp_path / "ck")
    sd = to_hf_state_dict(model)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*q_proj.*\(3, 3\), expected \(64, 64\)"):
        herd.load(tmp_path / "ck")
    sd = to_hf_state_dict(model)
    del sd["model.layers.1.feed_forward.router.weight"]
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors for layers.1.feed_forward.router.weight"):
        herd.load(tmp_path / "ck")


def test_corrupt_files(tmp_path):
    save_hf(debug_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        herd.load(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        herd.load(tmp_path / "ck")


def test_per_expert_layout(tmp_path):
    """The FP8-repo layout (experts.{e}.gate_proj...) stacks into the same model."""
    model = debug_model()
    save_hf(model, tmp_path / "ck")
    sd = to_hf_state_dict(model)
    for key in [k for k in sd if k.endswith("experts.gate_up_proj")]:
        gu, down = sd.pop(key), sd.pop(key.replace("gate_up_proj", "down_proj"))
        F = gu.shape[2] // 2
        for e in range(gu.shape[0]):
            p = key.replace("gate_up_proj", f"{e}.")
            sd[p + "gate_proj.weight"] = gu[e, :, :F].t().contiguous()
            sd[p + "up_proj.weight"] = gu[e, :, F:].t().contiguous()
            sd[p + "down_proj.weight"] = down[e].t().contiguous()
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    back = herd.load(tmp_path / "ck")
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
