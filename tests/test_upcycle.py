"""Sparse upcycling: the MoE grown from a dense model computes (nearly) the dense function at step 0, its router
learns, and herd and transformers both load it."""
import json

import pytest
import torch

import herd
from herd.checkpoint import save_hf
from herd.cli import main as cli
from herd.config import preset
from herd.model import MoE, Transformer
from herd.train.upcycle import closeness, upcycle

WORDS = "the cat sat on a mat while dog ran to big red house and small blue car went far away".split()


def dense_model(ffn_dim=128, tie=True, seed=1):
    cfg = preset("debug")
    cfg.moe, cfg.nope_every, cfg.attn_chunk_size, cfg.use_qk_norm = None, 0, None, False
    cfg.attn_temperature_tuning, cfg.tie_embeddings, cfg.source, cfg.ffn_dim = False, tie, "llama", ffn_dim
    cfg.__post_init__()
    return Transformer(cfg).init_weights(std=0.1, seed=seed).eval()


def make_tokenizer(folder, vocab_size=300):
    """A small byte-level BPE (tokenizers library) with a ChatML template, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": template}))
    return folder


def test_zero_router_is_exactly_the_dense_model():
    dense = dense_model()
    moe = upcycle(dense, n_experts=4, router_logit_std=0.0)
    ids = torch.randint(0, 512, (2, 48))
    c = closeness(dense, moe, ids)
    assert c["max_abs_logit_diff"] < 1e-4, c       # only float rounding: the gate is exactly sigmoid(0) = 1/2


def test_default_router_is_close_and_spreads_tokens():
    dense = dense_model()
    moe = upcycle(dense, n_experts=4)
    ids = torch.randint(0, 512, (4, 64))
    c = closeness(dense, moe, ids)
    print(c)
    assert 0 < c["max_abs_logit_diff"] and c["mean_kl"] < 1e-4 and c["top1_agreement"] >= 0.9, c
    # tokens are routed to every expert from step 0, and the router is trained through the gate
    moe.train()
    logits = moe(ids)
    for m in (m for m in moe.modules() if isinstance(m, MoE)):
        assert torch.bincount(m.router_logits.argmax(-1), minlength=4).min() > 0
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for m in (m for m in moe.modules() if isinstance(m, MoE)):
        assert m.router.weight.grad.abs().sum() > 0


def test_odd_width_and_top2():
    dense = dense_model(ffn_dim=127, tie=False)
    moe = upcycle(dense, n_experts=3, top_k=2, moe_every=2, router_logit_std=0.0)
    assert moe.config.moe.expert_dim == 64 and [s.is_moe for s in moe.config.layers] == [False, True, False, True]
    assert closeness(dense, moe, torch.randint(0, 512, (1, 32)))["max_abs_logit_diff"] < 1e-4


def test_cli_saves_a_checkpoint_herd_and_transformers_load(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    dense = dense_model()
    save_hf(dense, tmp_path / "dense")
    make_tokenizer(tmp_path / "dense")
    cli(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--probe-text",
         " ".join(WORDS * 3)])
    out = capsys.readouterr().out
    report = json.loads(out.split("step-0 closeness to the dense model: ")[1])
    assert report["top1_agreement"] >= 0.95 and report["mean_kl"] < 1e-3, report
    moe = herd.load(tmp_path / "moe")
    assert moe.config.moe.n_experts == 4 and (tmp_path / "moe" / "tokenizer.json").exists()
    ids = torch.randint(0, 512, (2, 40))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(ids).logits.float() - moe(ids)).abs().max().item() <= 1e-4
