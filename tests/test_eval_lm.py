"""herd eval lm in process: HerdLM's numbers against plain forwards of the model, the local task suite offline."""
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import herd  # noqa: E402
from herd.engine import Engine, generate_reference  # noqa: E402
from herd.eval import lm  # noqa: E402
from herd.eval.harness import HerdLM, score_prompts  # noqa: E402
from herd.tokenizer import load_tokenizer  # noqa: E402
from tiny_chat import write_tiny_chat_model  # noqa: E402

TASKS = Path(lm.TASKS_DIR) / "herd_smoke"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("tiny"))
    model = herd.load(folder).eval()
    return model, load_tokenizer(folder, eos_ids=model.config.eos_token_ids)


def forward_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and whether each is the argmax, from one plain forward."""
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    chosen = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return chosen, logp[:-1].argmax(-1) == torch.tensor(ids[1:])


def test_score_prompts_keeps_order_and_values(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 30, 9, 17, 2, 30, 11)]
    engine = Engine(model, max_batch=3)          # 7 prompts through 3 rows: several admissions
    scored = score_prompts(engine, prompts, top=2)
    for ids, entries in zip(prompts, scored):
        chosen, _ = forward_logprobs(model, ids)
        assert entries[0] is None and len(entries) == len(ids)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in entries[1:]]), chosen, atol=1e-4, rtol=0)


def test_loglikelihood_equals_the_forward(tiny):
    """(sum of the continuation's logprobs, whether greedy) for lm-eval requests, including one left-truncated past
    max_length as local-completions truncates."""
    model, tok = tiny
    harness = HerdLM(model, tok, batch_size=4, max_seq_len=24)
    g = torch.Generator().manual_seed(2)
    reqs = [(None, torch.randint(3, 500, (c,), generator=g).tolist(), torch.randint(3, 500, (k,), generator=g).tolist())
            for c, k in ((5, 3), (12, 1), (1, 6), (30, 4))]
    got = harness._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (_, ctx, cont), (logprob, greedy) in zip(reqs, got):
        whole = (ctx + cont)[-harness.max_length:]
        chosen, is_max = forward_logprobs(model, whole)
        assert math.isclose(logprob, float(chosen[-len(cont):].sum()), abs_tol=1e-3)
        assert greedy == bool(is_max[-len(cont):].all())
    # a continuation made of the greedy tokens is greedy
    ctx = reqs[0][1]
    cont = generate_reference(model, ctx, 4)
    assert harness._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)[0][1] is True


def test_rolling_loglikelihood_sums_every_token(tiny):
    """A text shorter than the context: one window, every token scored after the prefix token."""
    model, tok = tiny
    harness = HerdLM(model, tok, batch_size=2, max_seq_len=256)
    text = "Llamas live in herds in the mountains of South America."

    class Req:
        args = (text,)
    got = harness.loglikelihood_rolling([Req()], disable_tqdm=True)[0]
    chosen, _ = forward_logprobs(model, [harness.prefix_token_id] + tok.encode(text))
    assert math.isclose(got, float(chosen.sum()), abs_tol=1e-3)


def test_generate_until_stops_at_the_until_string(tiny):
    model, tok = tiny
    harness = HerdLM(model, tok, batch_size=2, max_seq_len=256)
    prompt = "The quick brown fox"
    greedy = tok.decode(generate_reference(model, tok.encode(prompt), 12, eos_ids=tok.eos_ids))
    assert len(greedy) > 4

    class Req:
        def __init__(self, until):
            self.args = (prompt, {"until": until, "max_gen_toks": 12, "do_sample": False})
    stop = greedy[2:4]
    out = harness.generate_until([Req([stop]), Req([])], disable_tqdm=True)
    assert out[0] == greedy[:greedy.index(stop)]
    assert out[1] == greedy


def mc_reference(model, tok, prefix_id, rows):
    """Accuracy of multiple-choice rows computed by hand: each choice's summed logprob after the context, from
    plain forwards; lm-eval's encoding (context and context + choice encoded, the choice = the extra tokens)."""
    right = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            ctx = tok.encode(row["context"]) if row["context"] else [prefix_id]
            whole = tok.encode(row["context"] + choice) if row["context"] else [prefix_id] + tok.encode(choice)
            chosen, _ = forward_logprobs(model, whole)
            scores.append(float(chosen[len(ctx) - 1:].sum()))
        right += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
    return right / len(rows)


def test_ci_task_accuracy_equals_hand_computation(tiny, tmp_path):
    """lm-eval's accuracy on the 20-item local task, offline, equals the same accuracy computed by hand."""
    model, tok = tiny
    res = lm.evaluate_in_process(model, tok, ["herd_smoke_ci"], batch_size=8, max_seq_len=256)
    rows = [json.loads(x) for x in (TASKS / "ci.jsonl").read_text().splitlines()]
    assert res["n-samples"]["herd_smoke_ci"]["effective"] == 20
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_ids[0]
    assert res["results"]["herd_smoke_ci"]["acc,none"] == pytest.approx(mc_reference(model, tok, prefix, rows))
    lm.write_json(res, tmp_path / "r.json", {"model": "tiny"})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["herd"] == {"model": "tiny"} and "herd_smoke_ci" in saved["results"]
    assert "herd_smoke_ci" in lm.format_results(res)


def test_suite_files_are_well_formed():
    """Every multiple-choice item has distinct choices (none a prefix of another) and a gold index in range; the
    suite has a few hundred items and the CI task 20."""
    total = 0
    for path in TASKS.glob("*.jsonl"):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        if path.name != "ci.jsonl":
            total += len(rows)
        for r in rows:
            if "choices" in r:
                c = r["choices"]
                assert 0 <= r["gold"] < len(c) and len(set(c)) == len(c), r
                assert not any(a != b and b.startswith(a) for a in c for b in c), r
            else:
                assert r["context"] and r["target"].startswith(" "), r
    assert total >= 300
    assert len((TASKS / "ci.jsonl").read_text().splitlines()) == 20


def test_unknown_task_is_refused(monkeypatch):
    from lm_eval.tasks import TaskManager

    class Indexed(TaskManager):       # skip indexing lm-eval's own 14k task files (~30 s) in this test
        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path, include_defaults=False, **kw)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", Indexed)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        lm.task_manager(["no_such_task_here"])


def test_task_whose_dataset_is_not_here_says_what_to_do(tiny, tmp_path):
    """Offline, a task over a Hub dataset that is not in the local cache ended in a `datasets` traceback; it is a
    ValueError (the CLI's clean error) that names the task and herd's offline tasks."""
    (tmp_path / "hub_only.yaml").write_text(
        "task: herd_test_hub_only\ndataset_path: herd-tests/no-such-dataset-anywhere\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    model, tok = tiny
    with pytest.raises(ValueError, match=r"no-such-dataset-anywhere.*offline.*herd_test_hub_only.*herd_smoke"):
        lm.evaluate_in_process(model, tok, ["herd_test_hub_only"], include=[str(tmp_path)])
