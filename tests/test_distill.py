"""Distillation: the KL losses, the tokenizer check, the teacher top-k cache, `herd synth`, and `herd distill` end to
end on tiny models (the KL to the teacher falls)."""
import argparse
import json

import pytest
import torch

from herd.checkpoint import save_hf
from herd.cli import main as cli
from herd.config import preset
from herd.train.data import ByteTokenizer, TokenLoader, load_tokens, read_documents
from herd.train.distill import DistillError, TeacherCache, build_teacher_cache, check_same_tokenizer, kl_full, kl_topk
from herd.model import Transformer
from herd.tokenizer import load_tokenizer
from herd.train.train import add_train_flags, train
from test_upcycle import WORDS, make_tokenizer


def test_kl_full_and_topk():
    s, t = torch.randn(2, 5, 50), torch.randn(2, 5, 50) * 3
    assert kl_full(t, t).abs() < 1e-6
    ref = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kl_full(s, t), ref)
    top = t.log_softmax(-1).topk(50, dim=-1)         # k = V: top-k KL is the full KL, at any temperature
    for temp in (1.0, 2.0):
        torch.testing.assert_close(kl_topk(s, top.values, top.indices, temp), kl_full(s, t, temp))
    top = t.log_softmax(-1).topk(5, dim=-1)
    assert kl_topk(t, top.values, top.indices) < kl_topk(s, top.values, top.indices)


def test_tokenizer_check(tmp_path):
    bpe = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    check_same_tokenizer(bpe, bpe, 512, 512)
    with pytest.raises(DistillError, match=r"do not share a tokenizer: vocab_size 512 \(teacher\) vs 600 \(student\)"):
        check_same_tokenizer(bpe, bpe, 512, 600)
    with pytest.raises(DistillError, match="probe text .* first difference at token 0"):
        check_same_tokenizer(bpe, ByteTokenizer(), 512, 512)


@pytest.fixture
def teacher_and_data(tmp_path):
    """A random debug-shaped teacher with a BPE tokenizer, and synthetic training text it wrote via `herd synth`."""
    torch.manual_seed(0)
    teacher = Transformer(preset("debug")).init_weights(std=0.02, seed=3)
    with torch.no_grad():      # large embeddings and output: a peaked, mostly bigram teacher a student can learn fast
        teacher.tok_embeddings.weight.mul_(15)
        teacher.output.weight.mul_(15)
    save_hf(teacher, tmp_path / "teacher")
    make_tokenizer(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("# comment\n" + "\n".join(" ".join(WORDS[i:i + 5]) for i in range(12)))
    cli(["synth", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "prompts.txt"), "--out",
         str(tmp_path / "synth.jsonl"), "--max-tokens", "40", "--batch-size", "6", "--seed", "1", "--threads", "1"])
    return tmp_path / "teacher", tmp_path / "synth.jsonl"


def test_synth_writes_teacher_text(teacher_and_data):
    teacher, data = teacher_and_data
    # "\n" only, as herd reads JSONL (train/data.py): the sampled text may hold a raw U+2028 or U+0085, where
    # str.splitlines would also break
    recs = [json.loads(l) for l in data.read_text(encoding="utf-8").split("\n") if l]
    assert len(recs) == 12 and recs[0]["prompt"] == " ".join(WORDS[:5])
    assert all(r["text"].startswith("<|im_start|>user\n" + r["prompt"]) for r in recs)
    assert all("<|im_start|>assistant\n" in r["text"] for r in recs)
    assert len(read_documents([data])) == 12


def test_teacher_cache_round_trip(tmp_path, teacher_and_data):
    import herd
    teacher_dir, data = teacher_and_data
    teacher = herd.load(teacher_dir)
    tokens = load_tokens([data], load_tokenizer(teacher_dir), 512)
    loader = TokenLoader(tokens, 32, 1, shuffle=False)
    build_teacher_cache(teacher, loader, 8, tmp_path / "c.safetensors", "t", "fp", batch_size=3, progress=False)
    cache = TeacherCache(tmp_path / "c.safetensors", "fp", 32, 512)
    win = torch.tensor([2, 0])
    lp, ids = cache.lookup(win)
    with torch.no_grad():
        ref = teacher(loader.windows(win)[0]).log_softmax(-1).topk(8, dim=-1)
    torch.testing.assert_close(lp, ref.values)
    assert torch.equal(ids, ref.indices)
    with pytest.raises(DistillError, match="teacher cache made for other data"):
        TeacherCache(tmp_path / "c.safetensors", "other", 32, 512)


def distill(tmp_path, teacher, data, *flags, out="d"):
    argv = ["--teacher", str(teacher), "--student", "debug", "--data", str(data), "--seq-len", "32",
            "--batch-size", "4", "--steps", "40", "--lr", "3e-3", "--no-progress", "--no-plots", "--threads", "1",
            "--out", str(tmp_path / out), *map(str, flags)]
    train(add_train_flags(argparse.ArgumentParser(), distill=True).parse_args(argv))
    return [json.loads(l) for l in (tmp_path / out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("top_k", [0, 16])
def test_distill_reduces_kl_to_teacher(tmp_path, teacher_and_data, top_k):
    teacher, data = teacher_and_data
    recs = distill(tmp_path, teacher, data, "--kd-top-k", top_k, "--kd-weight", "1.0", "--temperature", "1.0")
    first, last = recs[0]["kd"], sum(r["kd"] for r in recs[-3:]) / 3
    print("KL to the teacher, first step and last 3:", first, last)
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "d" / "teacher_topk.safetensors").exists() == (top_k > 0)
    assert (tmp_path / "d" / "checkpoints" / "step_000040" / "tokenizer.json").exists()


def test_distill_refuses_a_student_with_another_vocabulary(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    cfg = preset("debug").to_dict()
    (tmp_path / "big.json").write_text(json.dumps(cfg | {"vocab_size": 640}))
    with pytest.raises(DistillError, match=r"vocab_size 512 \(teacher\) vs 640 \(student\)"):
        distill(tmp_path, teacher, data, "--student", tmp_path / "big.json")
