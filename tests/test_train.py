"""The training loop on the `debug` preset: loss falls, router balancing, exact resume, HF loading of trained
checkpoints, torchrun DDP/FSDP2 = one process, and bad input (data, memory, resume config, NaN loss)."""
import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import herd
from herd.train import losses
from herd.checkpoint import save_hf
from herd.config import preset
from herd.train.data import DataError
from herd.model import Transformer
from herd.train.train import TrainingError, add_train_flags, train

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the cat sat on a mat while dog ran to big red house and small blue car went far away over "
         "green hills under old trees near quiet river").split()


def make_text(path: Path, n_lines=400, seed=0) -> Path:
    rnd = random.Random(seed)
    path.write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(12)) for _ in range(n_lines)))
    return path


def run(tmp_path, *flags, data=None, out="run"):
    data = data or make_text(tmp_path / "a.txt")
    argv = ["--data", str(data), "--tokenizer", "bytes", "--seq-len", "64", "--batch-size", "4", "--no-progress",
            "--no-plots", "--threads", "1", *map(str, flags)]
    if "--out" not in flags:
        argv += ["--out", str(tmp_path / out)]
    if "--config" not in flags and "--resume" not in flags and "--init" not in flags:
        argv += ["--config", "debug"]
    args = add_train_flags(argparse.ArgumentParser()).parse_args(argv)
    return train(args)


def log(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs(tmp_path):
    s = run(tmp_path, "--steps", 40, "--lr", "3e-3", "--log-every", 5)
    recs = log(tmp_path / "run")
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 2.0, (first, last)           # bytes: ~ln(512)=6.2 at the start, < 4 after 40 steps
    r = recs[-1]
    for key in ("step", "loss", "lr", "tokens_per_s", "expert_load", "balance", "z", "grad_norm"):
        assert key in r
    assert r["moe_layers"] == [1, 3] and len(r["expert_load"][0]) == 4
    assert abs(sum(r["expert_load"][0]) - 1) < 1e-3
    ck = Path(s["checkpoint"])
    assert (ck / "model.safetensors").exists() and (ck / "config.json").exists()
    herd.load(ck)


def biased_init(tmp_path) -> Path:
    """A debug model whose routers all prefer expert 0: every token embedding carries a shared direction u (0.5 u:
    large next to the 0.02-std embeddings, so training at lr 1e-3 does not wash it out) and router row 0 points
    along u, so expert 0 wins every token in both MoE layers at step 0 by a logit margin of ~4 (not saturated)."""
    model = Transformer(preset("debug")).init_weights(std=0.02, seed=0)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        model.tok_embeddings.weight += 0.5 * u
        for i in (1, 3):
            model.layers[i].feed_forward.router.weight[0] += 1.0 * u
    save_hf(model, tmp_path / "biased")
    return tmp_path / "biased"


def final_shares(folder: Path, last_n=10) -> torch.Tensor:
    """Per layer and expert token share, averaged over the last logged steps: (layers, E)."""
    return torch.tensor([r["expert_load"] for r in log(folder)[-last_n:]]).mean(0)


def test_balancing_loss_prevents_collapse(tmp_path):
    init = biased_init(tmp_path)
    common = ["--init", init, "--steps", 100, "--lr", "1e-3"]
    run(tmp_path, *common, "--balance-coef", 0, out="off")
    run(tmp_path, *common, out="on")           # the default coefficient, 0.01
    off, on = final_shares(tmp_path / "off"), final_shares(tmp_path / "on")
    for name in ("off", "on"):                  # both runs start collapsed onto one expert in every MoE layer
        start = torch.tensor(log(tmp_path / name)[0]["expert_load"])
        assert start.max(-1).values.min() > 0.95, start
    print("token shares over the last 10 steps, without balancing:", off.tolist(), "with:", on.tolist())
    assert off.max(-1).values.min() > 0.75, off               # without the loss: still > 3x uniform in every layer
    assert on.max() <= 2 * 0.25, on                           # with it: no expert above 2x uniform (E = 4)


def test_resume_is_bit_identical(tmp_path):
    data = make_text(tmp_path / "a.txt")
    run(tmp_path, "--steps", 8, "--save-every", 4, "--keep", 5, data=data, out="full")
    run(tmp_path, "--resume", tmp_path / "full" / "checkpoints" / "step_000004", "--steps", 8, data=data,
        out="resumed")
    a, b = tmp_path / "full" / "checkpoints" / "step_000008", tmp_path / "resumed" / "checkpoints" / "step_000008"
    for f in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)
    losses_full = [r["loss"] for r in log(tmp_path / "full") if r["step"] > 4]
    assert losses_full == [r["loss"] for r in log(tmp_path / "resumed")]
    assert json.loads((b / "state.json").read_text())["data"] == json.loads((a / "state.json").read_text())["data"]


def test_transformers_loads_trained_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    s = run(tmp_path, "--steps", 3)
    ck = Path(s["checkpoint"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(ck, attn_implementation="eager").eval()
    ids = torch.randint(0, 259, (2, 40))                   # 40 tokens: several 16-token chunks, NoPE temperature on
    with torch.no_grad():
        ref = hf(ids).logits.float()
    out = herd.load(ck)(ids)
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, mode):
    data = make_text(tmp_path / "a.txt")
    flags = ["--config", "debug", "--data", data, "--tokenizer", "bytes", "--seq-len", "64", "--steps", "4",
             "--no-progress", "--no-plots", "--threads", "1"]
    run(tmp_path, "--steps", 4, data=data, out="one")              # 1 process, batch 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "herd.train",
           *map(str, flags), "--batch-size", "2", "--parallel", mode, "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = [r["loss"] for r in log(tmp_path / "one")], [r["loss"] for r in log(tmp_path / "two")]
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert one[-1] < one[0]


DIST_SCRIPT = """
import torch, torch.distributed as dist
from herd.train.parallel import all_reduce, distributed
with distributed("cpu") as d:                  # joins the group here: leaves it destroyed
    t = all_reduce(torch.ones(1))
print(f"rank {d.rank}: sum {t.item():.0f}, group destroyed: {not dist.is_initialized()}")
"""


def test_distributed_destroys_only_the_group_it_joined(tmp_path):
    # Exiting with a live gloo group can abort the process (SIGABRT, "terminate called without an active
    # exception"): that failed a 2-process FSDP run above after its training had finished.
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sum 2, group destroyed: True" in p.stdout, p.stdout
    # a group the caller joined (here a 1-process one) is the caller's to destroy
    import torch.distributed as dist
    from herd.train.parallel import distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with distributed("cpu"):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_empty_and_non_utf8_data(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        run(tmp_path, "--steps", 1, data=tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3"):
        run(tmp_path, "--steps", 1, data=tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(DataError, match='line 2 needs a string field "text"'):
        run(tmp_path, "--steps", 1, data=tmp_path / "bad.jsonl")


def test_batch_too_large_for_memory(tmp_path):
    # The machine's real available memory: a 200k x 4096 batch cannot fit anywhere this runs.
    with pytest.raises(TrainingError, match=r"--batch-size 200000 x --seq-len 4096 needs about .* GiB is available: "
                                            r"at most \d+ sequence"):
        run(tmp_path, "--steps", 1, "--batch-size", 200000, "--seq-len", 4096)
    # With a stated limit the error names the largest batch that fits, and that batch passes the check.
    with pytest.raises(TrainingError) as e:
        run(tmp_path, "--steps", 1, "--batch-size", 64, "--memory-limit", 0.03)
    fits = int(re.search(r"at most (\d+) sequence", str(e.value)).group(1))
    assert 1 <= fits < 64
    run(tmp_path, "--steps", 1, "--batch-size", fits, "--memory-limit", 0.03)


def test_resume_with_a_different_config(tmp_path):
    data = make_text(tmp_path / "a.txt")
    run(tmp_path, "--steps", 2, data=data)
    other = preset("debug").to_dict() | {"dim": 32}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(TrainingError, match="model config differs .* hidden_size"):
        run(tmp_path, "--resume", tmp_path / "run", "--config", tmp_path / "other.json", "--steps", 4, data=data,
            out="run2")
    with pytest.raises(TrainingError, match="used seq_len = 64, not 32"):
        run(tmp_path, "--resume", tmp_path / "run", "--steps", 4, "--seq-len", 32, data=data, out="run2")


def test_a_new_run_never_replaces_a_saved_one(tmp_path):
    """The same command again without --resume used to rewrite the first run's log and, saving, delete its
    checkpoints: refused, the run untouched; --resume goes on with it."""
    data = make_text(tmp_path / "a.txt")
    run(tmp_path, "--steps", 2, data=data)
    saved = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"--out .*run already holds a run \(its checkpoint step_000002\): --resume"):
        run(tmp_path, "--steps", 4, data=data)
    run(tmp_path, "--steps", 2, data=data, out="other")
    with pytest.raises(TrainingError, match="already holds a run"):     # resuming another run into it: the same
        run(tmp_path, "--resume", tmp_path / "other", "--steps", 4, "--out", tmp_path / "run", data=data)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == saved
    assert run(tmp_path, "--resume", tmp_path / "run", "--steps", 3, data=data)["step"] == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = losses.cross_entropy, {"n": 0}

    def poisoned(logits, targets):          # a run whose 5th step diverges
        calls["n"] += 1
        ce = real(logits, targets)
        return ce * float("nan") if calls["n"] >= 5 else ce

    monkeypatch.setattr(losses, "cross_entropy", poisoned)
    msg = r"loss is nan .* at step 5: stopped .* Last good checkpoint: .*step_000004"
    with pytest.raises(TrainingError, match=msg):
        run(tmp_path, "--steps", 10, "--save-every", 2)
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000002", "step_000004"]
    model = herd.load(ck / "step_000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert log(tmp_path / "run")[-1]["error"] == "non-finite loss"
