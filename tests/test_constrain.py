"""Grammar-constrained decoding (constrain.py + the engine's per-request constraint hook): a tiny random model,
sampled at temperature 1, must still produce JSON that validates; unconstrained rows in the same batch are
untouched."""
import json

import jsonschema
import pytest
import torch

import herd
from herd.chat import parse_tool_calls
from herd.constrain import Compiler, GrammarError, token_bytes, tool_call_schema
from herd.engine import Engine, SamplingParams, generate
from herd.tokenizer import load_tokenizer
from tiny_chat import write_byte_tokenizer_model, write_tiny_chat_model

# every path through this schema is short, so a random model always finishes it within max_tokens
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"legs": {"type": "integer",
                "minimum": 0, "maximum": 8}}, "required": ["legs"], "additionalProperties": False}]},
    },
    "required": ["name", "age", "unit", "tags", "ok", "pet"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Paris", "Lima"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))
    model, tok = herd.load(folder), load_tokenizer(folder)
    return model, tok, Compiler(tok, model.config.vocab_size, [2])


def _sampled(model, prompt, compiler, compiled, seeds, max_tokens=120):
    """One constrained request per seed, all in one batch, at temperature 1."""
    engine = Engine(model, max_batch=len(seeds))
    reqs = [engine.add(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, stop_token_ids=(2,)),
                       constraint=compiler.constraint(compiled)) for s in seeds]
    while engine.has_work():
        engine.step()
    return reqs


def test_json_schema_holds_for_a_random_model(tiny):
    model, tok, compiler = tiny
    prompt = tok.encode("Describe a person as JSON:")
    reqs = _sampled(model, prompt, compiler, compiler.json_schema(BOUNDED), seeds=range(12))
    for r in reqs:
        assert r.finish_reason == "stop" and r.output[-1] == 2, tok.decode(r.output)
        jsonschema.validate(json.loads(tok.decode(r.output)), BOUNDED)
    assert len({tok.decode(r.output) for r in reqs}) > 6          # sampling really varied the answers
    # the reference: the same model and seeds without the constraint do not produce valid JSON
    engine = Engine(model, max_batch=4)
    free = [engine.add(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=s, stop_token_ids=(2,)))
            for s in range(4)]
    while engine.has_work():
        engine.step()
    for r in free:
        with pytest.raises(ValueError):
            json.loads(tok.decode(r.output))


def test_constrained_and_free_rows_share_a_batch(tiny):
    model, tok, compiler = tiny
    prompts = [tok.encode("hello"), tok.encode("The quick brown fox")]
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = generate(model, [prompts[1]], greedy)[0].output
    engine = Engine(model, max_batch=2)
    constrained = engine.add(prompts[0], SamplingParams(max_tokens=60, stop_token_ids=(2,)),
                             constraint=compiler.constraint(compiler.json_object()))
    free = engine.add(prompts[1], greedy)
    while engine.has_work():
        engine.step()
    assert free.output == alone
    if constrained.finish_reason == "stop":
        assert isinstance(json.loads(tok.decode(constrained.output)), dict)
    else:   # json_object is unbounded: a cut answer is still a valid JSON prefix that opens an object
        assert tok.decode(constrained.output).startswith("{")


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_parse_and_match_the_schema(tiny, choice):
    model, tok, compiler = tiny
    tools = [WEATHER, TIME]
    schema = tool_call_schema(tools, key="arguments", name="get_weather" if choice == "named" else None)
    if choice == "required":        # keep the random model's lists short
        schema["maxItems"] = 3
    reqs = _sampled(model, tok.encode("What is the weather?"), compiler, compiler.json_schema(schema), range(8),
                    max_tokens=300)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for r in reqs:
        assert r.finish_reason == "stop", tok.decode(r.output)
        content, calls = parse_tool_calls(tok.decode(r.output), set(params))
        assert content is None and calls
        for c in calls:
            if choice == "named":
                assert c["name"] == "get_weather"
            jsonschema.validate(c["arguments"], params[c["name"]])


def test_bad_schemas_are_refused(tiny):
    _, _, compiler = tiny
    with pytest.raises(GrammarError, match="bogus"):
        compiler.json_schema({"type": "bogus"})
    with pytest.raises(GrammarError):
        tool_call_schema([WEATHER], name="nope")


def test_token_bytes_spell_the_text(tiny, tmp_path):
    _, tok, _ = tiny
    table = token_bytes(tok, 512)
    text = 'Ünïcode "quotes" {json: [1, 2]} \\ done 🦙'
    assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8")
    assert table[0] == table[1] == table[2] == b""                 # special tokens
    # Llama 4's tiktoken format: byte ranks, then the 2048 special tokens
    l4 = load_tokenizer(write_byte_tokenizer_model(tmp_path))
    table = token_bytes(l4, 256 + 2048)
    assert b"".join(table[i] for i in l4.encode(text)) == text.encode("utf-8")
    assert table[l4.token_id("<|eot|>")] == b"" and len(table) == 2304


def test_mask_is_applied_in_place_on_a_row(tiny):
    model, tok, compiler = tiny
    c = compiler.constraint(compiler.json_schema({"enum": ["yes"]}))
    logits = torch.zeros(2, model.config.vocab_size)
    c.mask(logits[1])
    allowed = (logits[1] == 0).nonzero().flatten().tolist()
    assert allowed and all(b'"yes"'.startswith(token_bytes(tok, 512)[i]) for i in allowed)
    assert bool((logits[0] == 0).all())                            # the other row is untouched
