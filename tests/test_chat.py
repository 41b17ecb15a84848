"""Llama 4's tiktoken tokenizer and native chat format, on a small synthetic tokenizer.model."""
import base64

import pytest

from herd.chat import ChatError, format_chat, stop_token_ids
from herd.tokenizer import TokenizerError, load_tokenizer, llama4_special_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level tokenizer.model (256 single bytes + a few merges) in Llama 4's file format."""
    folder = tmp_path_factory.mktemp("l4tok")
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"ll", b"llama", b"\n\n"]
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(ranks)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return load_tokenizer(folder)


def test_special_token_ids(tok):
    base = 262   # number of ranks; the real file has 200000 and these land at the spec's ids
    names = llama4_special_tokens()
    assert len(names) == 2048
    for name, offset in [("<|begin_of_text|>", 0), ("<|header_start|>", 5), ("<|eom|>", 7), ("<|eot|>", 8),
                         ("<|python_start|>", 16), ("<|finetune_right_pad|>", 18), ("<|image_start|>", 80),
                         ("<|tile_x_separator|>", 84), ("<|image|>", 90), ("<|patch|>", 92),
                         ("<|reasoning_thinking_start|>", 1142), ("<|reserved_special_token_903|>", 2047)]:
        assert tok.token_id(name) == base + offset, name
    assert tok.vocab_size == base + 2048
    assert tok.eos_ids == [base + 1, base + 7, base + 8]


def test_encode_decode_and_special_text(tok):
    text = "the llama said: <|eot|> hello"
    ids = tok.encode(text, allow_special=False)
    assert tok.token_id("<|eot|>") not in ids and tok.decode(ids) == text
    assert tok.token_id("<|eot|>") in tok.encode(text)
    assert tok.encode("the")[0] == 257


def test_llama4_chat_layout(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot|>"}]
    ids = format_chat(tok, messages)
    sid = tok.token_id
    assert ids[0] == sid("<|begin_of_text|>") and ids.count(sid("<|begin_of_text|>")) == 1
    text = tok.decode(ids, skip_special=False)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nHi <|eot|><|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n")
    # the user's literal "<|eot|>" stayed text: exactly two real <|eot|> ids (system and user terminators)
    assert ids.count(sid("<|eot|>")) == 2


def test_llama4_tools_and_tool_results(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    text = tok.decode(format_chat(tok, messages, tools=tools), skip_special=False)
    assert "get_weather" in text.split("<|header_start|>user")[0]          # tool list in the system message
    assert '[get_weather(city="Oslo", days=2)]<|eom|>' in text
    assert "<|header_start|>ipython<|header_end|>\n\nsunny<|eom|>" in text
    assert stop_token_ids(tok) == tok.eos_ids


def test_bad_input(tok, tmp_path):
    with pytest.raises(ChatError, match="role must be one of"):
        format_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatError, match="non-empty list"):
        format_chat(tok, [])
    with pytest.raises(ChatError, match="content must be a string or a list"):
        format_chat(tok, [{"role": "user", "content": 5}])
    (tmp_path / "tokenizer.model").write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match="line 1"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "..")
