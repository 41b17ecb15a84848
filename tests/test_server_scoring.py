"""The server as lm-eval and vLLM clients use it for scoring: echo + logprobs (prompt-token logprobs against the
model's own forward and, on the default GGUF, transformers'), token-array and batched prompts, max_tokens 0, the
tokenizer endpoints, the 400s, and lm-eval's own local-completions client against a live server."""
import json
import math
import urllib.error
import urllib.request

import pytest
import torch

import herd
from herd.tokenizer import load_tokenizer
from test_server import KEY, LiveServer
from tiny_chat import write_tiny_chat_model

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("tiny"))
    model = herd.load(folder).eval()
    return folder, model, load_tokenizer(folder, eos_ids=model.config.eos_token_ids)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = LiveServer([f"tiny={tiny[0]}", "--api-key", KEY, "--max-batch", "8", "--max-seq-len", "512"],
                   tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def post(server, path, body, key=KEY):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(server, path):
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def forward(model, ids, k):
    """Each token's logprob given the ones before it, and the top-k, from one plain forward."""
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logp[:-1].topk(k, -1)


def check_echo(lp, ids, model, tok, k):
    """An echoed prompt's logprobs object against the forward: tokens, null first entry, values, top-k, offsets."""
    n = len(ids)
    assert lp["tokens"][:n] == [tok.decode([i], skip_special=False) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    chosen, top = forward(model, ids, max(k, 1))
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:n], chosen.tolist())) < 1e-4
    for j, entry in enumerate(lp["top_logprobs"][1:n]):      # logprobs 0: no alternatives
        assert len(entry) <= k and (k == 0 or abs(max(entry.values()) - float(top.values[j, 0])) < 1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_logprobs_equal_the_forward(server, tiny):
    _, model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    c = server.client()
    r = c.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=3)
    ch = r.choices[0]
    assert ch.text == text and ch.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = ch.logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids)
    check_echo(lp, ids, model, tok, 3)
    # the same prompt as a token-id array, with one generated token after it (lm-eval's request)
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids) + 1 and r.usage.completion_tokens == 1
    check_echo(lp, ids, model, tok, 1)


def test_batched_token_array_prompts(server, tiny):
    """A list of token-id arrays in one request (lm-eval's batches): one choice per prompt, in order, each with its
    own prompt's logprobs; and a list of strings."""
    _, model, tok = tiny
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (7, 31, 2, 18, 12)]
    status, r = post(server, "/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": 1, "echo": True,
                                                 "logprobs": 1, "temperature": 0})
    assert status == 200 and [ch["index"] for ch in r["choices"]] == list(range(len(prompts)))
    for ids, ch in zip(prompts, r["choices"]):
        assert len(ch["logprobs"]["token_logprobs"]) == len(ids) + 1
        check_echo(ch["logprobs"], ids, model, tok, 1)
    texts = ["Llamas live in herds.", "Paris is the capital of France."]
    status, r = post(server, "/v1/completions", {"model": "tiny", "prompt": texts, "max_tokens": 0, "echo": True,
                                                 "logprobs": 0})
    assert status == 200 and [ch["text"] for ch in r["choices"]] == texts
    for text, ch in zip(texts, r["choices"]):
        check_echo(ch["logprobs"], tok.encode(text), model, tok, 0)


def test_streamed_echo_equals_whole(server, tiny):
    c = server.client()
    kw = dict(model="tiny", prompt="Servers answer requests", max_tokens=5, echo=True, logprobs=2, temperature=0)
    whole = c.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(ch.text for ch in chunks) == whole.text
    tokens = [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens]
    lps = [x for ch in chunks if ch.logprobs for x in ch.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens
    assert lps[0] is None and max(abs(a - b) for a, b in zip(lps[1:], whole.logprobs.token_logprobs[1:])) < 1e-5
    scored = [ch.choices[0] for ch in c.completions.create(stream=True, **{**kw, "max_tokens": 0}) if ch.choices]
    assert "".join(ch.text for ch in scored) == "Servers answer requests"
    assert scored[-1].finish_reason == "length"


def test_tokenizer_endpoints_round_trip(server, tiny):
    _, _, tok = tiny
    text = "What is the weather like in Oslo today? <|im_end|>"
    status, r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert status == 200 and r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512 and "".join(r["token_strs"]) == text
    assert r["tokens"][-1] == tok.eos_ids[0]            # special-token text is the special token
    status, back = post(server, "/detokenize", {"tokens": r["tokens"]})
    assert status == 200 and back["prompt"] == text
    info = get(server, "/tokenizer_info")
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 512
    status, r = post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert r["tokens"] == [tok.eos_ids[0]]                 # lm-eval's eos_token_id = encode(eos_token)[0]
    assert info == get(server, "/tokenizer_info?model=tiny")


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo", "completions"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
    ("/v1/completions", {"prompt": [1, 2, 100000], "max_tokens": 1}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": [[1, 2], [3, -1]], "max_tokens": 1}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens", "outside the vocabulary"),
])
def test_bad_scoring_requests_are_clear_400s(server, path, body, param, words):
    status, r = post(server, path, {"model": "tiny", **body})
    assert status == 400, r
    assert r["error"]["param"] == param and words in r["error"]["message"], r


def test_lm_eval_local_completions_against_a_live_server(server, tiny):
    """lm-eval's own client (tokenizer from the server's endpoints, token-array batches, echo + logprobs) on the
    20-item local task gives exactly the accuracy of lm-eval in process on the same model."""
    pytest.importorskip("lm_eval")
    from herd.eval import lm

    _, model, tok = tiny
    through_server = lm.evaluate_server(f"{server.url}/v1/completions", "tiny", ["herd_smoke_ci"], batch_size=8,
                                        max_length=512, api_key=KEY)
    in_process = lm.evaluate_in_process(model, tok, ["herd_smoke_ci"], batch_size=8, max_seq_len=512)
    a, b = through_server["results"]["herd_smoke_ci"], in_process["results"]["herd_smoke_ci"]
    assert through_server["n-samples"]["herd_smoke_ci"]["effective"] == 20
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    assert not math.isnan(a["acc,none"])


def test_default_gguf_logprobs_equal_transformers(tmp_path):
    """The default GGUF served in fp32 (--dequantize): each echoed prompt token's logprob equals transformers'
    log-softmax on the same file within 1e-3, prompts of different lengths scored in one batched request."""
    transformers = pytest.importorskip("transformers")
    from herd.textgen import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    texts = ["The capital of France is Paris. La capitale de la France est Paris. 法国的首都是巴黎。",
             "def add(a, b):\n    return a + b\n", "Llamas"]
    s = LiveServer(["default", "--dequantize", "--api-key", KEY, "--max-batch", "4"], tmp_path / "server.log")
    try:
        ids = [post(s, "/tokenize", {"prompt": t, "add_special_tokens": False})[1]["tokens"] for t in texts]
        status, r = post(s, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    finally:
        s.stop()
    assert status == 200 and [ch["text"] for ch in r["choices"]] == texts
    for prompt, ch in zip(ids, r["choices"]):
        with torch.inference_mode():
            logp = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        want = logp[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
        got = torch.tensor(ch["logprobs"]["token_logprobs"][1:])
        diff = (want - got).abs().max().item()
        assert len(got) == len(prompt) - 1 and diff <= 1e-3, diff
