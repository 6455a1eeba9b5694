"""Tools in chat, over the OpenAI HTTP front (the ``openai`` SDK as client) and gRPC Chat:
the model's own template renders the tools (Qwen2.5's and Llama 3.1's, on tiny random
models), ``tool_choice`` "required" or a named function is enforced by a grammar, "none"
leaves the tools out of the prompt, and the model's Hermes (``<tool_call>``) or Llama 3.1
JSON output is parsed into ``tool_calls``, whole and as streamed deltas."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from llmesh.gateway.tool_calls import HERMES, LLAMA3_JSON, ToolCallParser, ToolUse
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.http._structured_mesh import LLAMA, QWEN, sdk, structured_mesh

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def mesh(tiny_model_dirs, tmp_path_factory):
    with structured_mesh(tiny_model_dirs, tmp_path_factory.mktemp("tools-http")) as m:
        yield m


def _check_calls(calls, n=None):
    assert calls and (n is None or len(calls) == n)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", [QWEN, LLAMA])
def test_required_tool_choice_forces_a_valid_call(mesh, model):
    out = sdk(mesh).chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=3)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, n=1)


def test_named_tool_choice_streams_the_call(mesh):
    client = sdk(mesh)
    kw = dict(model=LLAMA, messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0.0,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**kw).choices[0]
    _check_calls(whole.message.tool_calls, n=1)
    assert whole.message.tool_calls[0].function.name == "get_time"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0] and deltas[0].function.name == "get_time"
    assert deltas[0].function.arguments == whole.message.tool_calls[0].function.arguments
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_parses_hermes_calls_from_the_text(mesh):
    """The model's output is forced (a regex) into Qwen's format; the gateway finds the call."""
    regex = r'Sure\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "unit": "C"\}\}\n</tool_call>'
    client = sdk(mesh)
    kw = dict(model=QWEN, messages=MESSAGES, tools=TOOLS, max_tokens=250, temperature=0.0,
              extra_body={"guided_regex": regex})
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure. "
    _check_calls(whole.message.tool_calls, n=1)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Sure. "
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_parses_llama_json_calls(mesh):
    regex = r'\{"name": "get_time", "parameters": \{"zone": "(UTC|CET)"\}\}'
    out = sdk(mesh).chat.completions.create(model=LLAMA, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                            temperature=0.0, extra_body={"guided_regex": regex}).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    _check_calls(out.message.tool_calls, n=1)


def test_tool_choice_none_leaves_tools_out_and_conversations_with_calls_render(mesh):
    client = sdk(mesh)
    plain = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=1)
    none = client.chat.completions.create(model=QWEN, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=1)
    auto = client.chat.completions.create(model=QWEN, messages=MESSAGES, tools=TOOLS, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    follow_up = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    for model in (QWEN, LLAMA):
        out = client.chat.completions.create(model=model, messages=follow_up, tools=TOOLS, max_tokens=2)
        assert out.usage.prompt_tokens > auto.usage.prompt_tokens


@pytest.mark.parametrize("kw, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "structured_output"),
])
def test_bad_tool_requests_are_400(mesh, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk(mesh).chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=5, **kw)
    assert param in f"{err.value.param} {err.value}"


def test_grpc_chat_returns_parsed_calls(mesh):
    request = inference_pb2.ChatRequest(
        model=QWEN, messages=[inference_pb2.ChatMessage(**m) for m in MESSAGES],
        sampling=common_pb2.SamplingParams(max_tokens=60, temperature=0.0),
        tools=[inference_pb2.Tool(name=t["function"]["name"], description=t["function"]["description"],
                                  parameters=json.dumps(t["function"]["parameters"])) for t in TOOLS],
        tool_choice=inference_pb2.ToolChoice(function="get_weather"))
    with grpc.insecure_channel(mesh["gateway"].address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        chunks = list(stub.Chat(request, timeout=120))
        whole = stub.ChatComplete(request, timeout=120)
    assert not "".join(c.text for c in chunks)
    calls = chunks[-1].tool_calls
    assert [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # The unary call gathers the same calls (greedy: the same arguments).
    (choice,) = whole.choices
    assert not choice.text and [(c.name, c.arguments) for c in choice.tool_calls] == [
        (c.name, c.arguments) for c in calls]


# ---- the parser alone ----------------------------------------------------------------------
def _parse(fmt, text, pieces, forced=None):
    parser = ToolCallParser(ToolUse(TOOLS, forced), fmt)
    shown = []
    step = max(1, len(text) // pieces)
    for i in range(0, len(text), step):
        shown.append(parser.feed(text[i:i + step]))
    rest, calls = parser.finish()
    return "".join(shown) + rest, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("pieces", [1, 3, 7, 1000])
def test_parser_splits_text_and_hermes_calls_however_the_text_arrives(pieces):
    text = ('Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call> Done <tool')
    shown, calls = _parse(HERMES, text, pieces)
    assert shown == "Checking. \n Done <tool"
    assert calls == [("get_weather", {"city": "Oslo", "unit": "F"}), ("get_time", {"zone": "UTC"})]


def test_parser_keeps_unknown_or_broken_calls_as_text():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call><tool_call>{not json</tool_call>'
    assert _parse(HERMES, text, 4) == (text, [])


def test_parser_llama_json_calls_and_plain_answers():
    text = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_weather", ' \
           '"parameters": {"city": "Lima", "unit": "C"}}'
    assert _parse(LLAMA3_JSON, text, 5) == ("", [("get_time", {"zone": "CET"}),
                                                ("get_weather", {"city": "Lima", "unit": "C"})])
    assert _parse(LLAMA3_JSON, "It is sunny {really}.", 3) == ("It is sunny {really}.", [])
    assert _parse(LLAMA3_JSON, '{"json": "but not a call"}', 2) == ('{"json": "but not a call"}', [])


def test_parser_forced_outputs():
    assert _parse(HERMES, '{"zone": "UTC"}', 3, forced="get_time") == ("", [("get_time", {"zone": "UTC"})])
    assert _parse(LLAMA3_JSON, '[{"name": "get_time", "parameters": {"zone": "CET"}}]', 2, forced="required") == \
        ("", [("get_time", {"zone": "CET"})])
