"""GGUF files: every supported tensor type, tied output, bad input."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter, quants

import herd
from herd.config import preset
from herd.gguf import GGUF_TO_NATIVE, GGUFError, open_gguf
from herd.model import Transformer

NATIVE_TO_GGUF = {v: k for k, v in GGUF_TO_NATIVE.items()}


def dense_model(tie=False):
    cfg = preset("debug")
    cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
    cfg.attn_temperature_tuning, cfg.tie_embeddings, cfg.source = False, tie, "llama"
    cfg.__post_init__()
    return Transformer(cfg).init_weights(std=0.2, seed=2).eval()


def write_gguf(model, path, matrix_type=Q.F32):
    """A llama-architecture GGUF of a herd model (q/k rows stay interleaved, as llama.cpp stores them)."""
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        generic = name.replace(name.split(".")[1], "{L}", 1) if name.startswith("layers.") else name
        gname = NATIVE_TO_GGUF[generic].replace("{L}", name.split(".")[1] if name.startswith("layers.") else "")
        arr = t.detach().numpy().astype(np.float32)
        if arr.ndim == 2 and matrix_type != Q.F32:
            w.add_tensor(gname, quants.quantize(arr, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype,tol", [(Q.F32, 0), (Q.F16, 2e-3), (Q.BF16, 2e-2), (Q.Q8_0, 2e-2),
                                       (Q.Q4_0, 0.3), (Q.Q4_1, 0.2)])
def test_tensor_types(tmp_path, qtype, tol):
    """Each type dequantizes to the original weights within its format's precision (relative, per tensor)."""
    model = dense_model()
    loaded = herd.load(write_gguf(model, tmp_path / "m.gguf", qtype))
    for name, ref in model.state_dict().items():
        got = loaded.state_dict()[name]
        err = (got - ref).norm() / ref.norm()
        assert err <= tol + 1e-7, f"{qtype.name} {name}: relative error {err:.4f}"
    if qtype == Q.F32:
        ids = torch.randint(0, 512, (1, 30))
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_tied_output_when_absent(tmp_path):
    model = dense_model(tie=True)
    loaded = herd.load(write_gguf(model, tmp_path / "tied.gguf"))
    assert loaded.config.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    ids = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_missing_truncated_and_not_gguf(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    path = write_gguf(dense_model(), tmp_path / "m.gguf", Q.Q8_0)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        herd.load(cut)
    cut.write_bytes(data[:200])
    with pytest.raises(GGUFError, match="truncated"):
        herd.load(cut)


def test_unknown_tensor_type(tmp_path):
    path = write_gguf(dense_model(), tmp_path / "m.gguf", Q.Q8_0)
    data = bytearray(path.read_bytes())
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32): patch the type of 'output.weight' to 99
    name = b"output.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == Q.Q8_0
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown tensor type 99"):
        herd.load(path)


def test_llama4_moe_gguf(tmp_path):
    """A llama4-architecture GGUF (stacked *_exps experts, shared experts, dense layers between MoE layers)."""
    cfg = preset("debug")
    cfg.attn_chunk_size, cfg.floor_scale = 8192, 8192.0     # llama.cpp's fixed llama4 conventions
    cfg.source = "llama4_text"
    cfg.__post_init__()
    model = Transformer(cfg).init_weights(std=0.2, seed=4).eval()
    w = GGUFWriter(str(tmp_path / "l4.gguf"), "llama4")
    for add, value in [(w.add_block_count, cfg.n_layers), (w.add_context_length, cfg.max_seq_len),
                       (w.add_embedding_length, cfg.dim), (w.add_feed_forward_length, cfg.ffn_dim),
                       (w.add_head_count, cfg.n_heads), (w.add_head_count_kv, cfg.n_kv_heads),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_layer_norm_rms_eps, cfg.norm_eps),
                       (w.add_vocab_size, cfg.vocab_size), (w.add_expert_count, cfg.moe.n_experts),
                       (w.add_expert_used_count, cfg.moe.top_k),
                       (w.add_expert_feed_forward_length, cfg.moe.expert_dim),
                       (w.add_interleave_moe_layer_step, cfg.moe_every)]:
        add(value)
    for name, t in model.state_dict().items():
        generic = name.replace(name.split(".")[1], "{L}", 1) if name.startswith("layers.") else name
        layer = name.split(".")[1] if name.startswith("layers.") else ""
        w.add_tensor(NATIVE_TO_GGUF[generic].replace("{L}", layer), t.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = herd.load(tmp_path / "l4.gguf")
    assert [s.is_moe for s in loaded.config.layers] == [s.is_moe for s in cfg.layers]
    assert loaded.config.use_qk_norm and not loaded.config.layers[3].uses_rope
    ids = torch.randint(0, 512, (2, 30))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
