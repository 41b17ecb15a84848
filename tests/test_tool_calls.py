"""Tool calls in and out of prompts: chat.parse_tool_calls (pythonic and JSON forms) and the prompt side for
templates without tool support (the default model's ChatML)."""
import json

import pytest

from herd.chat import format_chat, json_call_spans, parse_tool_calls, tool_call_start
from herd.textgen import default_model_path
from herd.tokenizer import load_tokenizer

NAMES = {"get_weather", "get_time", "search"}


@pytest.mark.parametrize("text, content, calls", [
    ('[get_weather(city="Oslo")]', None, [("get_weather", {"city": "Oslo"})]),
    ("[get_weather(city='San Francisco', days=3), get_time(tz=\"UTC\")]", None,
     [("get_weather", {"city": "San Francisco", "days": 3}), ("get_time", {"tz": "UTC"})]),
    ('[search(q="a", filters={"year": [2020, 2021], "exact": true, "lang": None}, top=-2, w=1.5)]', None,
     [("search", {"q": "a", "filters": {"year": [2020, 2021], "exact": True, "lang": None}, "top": -2, "w": 1.5})]),
    ('Let me check that for you. [get_weather(city="Oslo")]', "Let me check that for you.",
     [("get_weather", {"city": "Oslo"})]),
    ('<|python_start|>[get_weather(city="Oslo")]<|python_end|>', None, [("get_weather", {"city": "Oslo"})]),
    ('get_weather(city="Oslo")', None, [("get_weather", {"city": "Oslo"})]),
    ('[get_weather(city="a]b(c")]', None, [("get_weather", {"city": "a]b(c"})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('{"type": "function", "name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}', None,
     [("get_time", {"tz": "UTC"})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "arguments": {"tz": "CET"}}',
     None, [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]),
    ('Sure.\n[{"name": "get_time", "arguments": {}}, {"name": "search", "arguments": {"q": "x"}}]', "Sure.",
     [("get_time", {}), ("search", {"q": "x"})]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "llamas"}}\n</tool_call>', None,
     [("search", {"q": "llamas"})]),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c["name"], c["arguments"]) for c in got] == calls


@pytest.mark.parametrize("text", [
    "The answer is [1, 2, 3].",
    'Use {"name": "x"} as a template.',
    "[get_weather(city=os.system('rm -rf /'))]",        # not a literal: never evaluated, not a call
    '[get_weather(city="Oslo")',                         # unbalanced
    '[unknown_tool(city="Oslo")]',                       # not one of the tools
    '[get_weather("Oslo")]',                             # positional arguments are not the format
    "plain prose about get_weather and the weather",
])
def test_not_tool_calls(text):
    content, calls = parse_tool_calls(text, NAMES)
    assert calls == [] and content == text


def test_tool_call_start_holds_back_possible_calls():
    assert tool_call_start("Hello there", NAMES) == len("Hello there")
    assert tool_call_start("Sure. [get_w", NAMES) == len("Sure. ")
    assert tool_call_start("Sure. get_wea", NAMES) == len("Sure. ")        # a trailing piece of a tool name
    assert tool_call_start("Sure. {", NAMES) == len("Sure. ")


def test_json_call_spans_follow_a_growing_forced_call():
    """Every prefix of a forced (grammar-constrained) answer: the arguments found so far are a prefix of the final
    ones, closing brackets and quotes inside strings do not end them early, and the call's own '}' is not in them."""
    calls = [("get_weather", '{"city": "a}b\\"]", "days": [1, {"x": null}]}'), ("get_time", '{}'),
             ("search", '7')]
    text = "[" + ", ".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls) + "]"
    seen = []
    for end in range(len(text) + 1):
        spans = [(name, text[a:b]) for name, a, b in json_call_spans(text[:end], "parameters")]
        assert len(spans) >= len(seen) and all(args.startswith(old) for (_, old), (_, args) in zip(seen, spans))
        seen = spans
    assert seen == calls
    assert json_call_spans('{"name": "get_time", "arguments": {}}', "parameters") == []   # another key
    assert json_call_spans("Sure, here: {", "arguments") == []


def test_template_without_tools_gets_them_in_the_system_message():
    tok = load_tokenizer(default_model_path())
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'}]
    text = tok.decode(format_chat(tok, messages, tools), skip_special=False)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n") and '"name": "get_weather"' in system
    assert "Weather for a city" in system and "JSON object" in system
    # the past call as its JSON text, the result as a tool turn, then the generation prompt
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Oslo"}}<|im_end|>' in text
    assert '<|im_start|>tool\n{"temp_c": 4}<|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # what the instructions ask for is what the parser reads
    _, calls = parse_tool_calls(json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}), {"get_weather"})
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_template_with_tools_gets_them_itself():
    tok = load_tokenizer(default_model_path())
    tok.chat_template = (
        "{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}CALL "
        "{{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}|"
        "{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "4 C"}]
    text = tok.decode(format_chat(tok, messages, tools))
    # the template's own tool rendering, with arguments as an object (HF convention); no system text injected
    assert text == "TOOLS get_weather\nuser: Weather in Oslo?|assistant: CALL get_weather Oslo|tool: 4 C|"


def test_tool_call_start_holds_back_function_tags():
    assert tool_call_start("Sure. <func", NAMES) == len("Sure. ")
    assert tool_call_start('Sure. <function=search>{"q": "x"}', NAMES) == len("Sure. ")
    assert tool_call_start("a < b and c", NAMES) == len("a < b and c")
