"""Structured output over the OpenAI HTTP front (the ``openai`` SDK as client) and gRPC:
JSON schema (``response_format``), JSON mode, vLLM's ``guided_*`` and ``structured_outputs``
fields; every output parses and validates, streamed or whole; a bad schema, regex or
grammar is a 400 naming the field, and the engine keeps serving."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.http._structured_mesh import QWEN, sdk, structured_mesh

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0},
    "capital": {"type": "boolean"}, "zone": {"enum": ["north", "south"]}},
    "required": ["city", "population", "capital", "zone"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe Paris as JSON."}]


@pytest.fixture(scope="module")
def mesh(tiny_model_dirs, tmp_path_factory):
    with structured_mesh(tiny_model_dirs, tmp_path_factory.mktemp("structured-http")) as m:
        yield m


def _schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def test_json_schema_response_validates_whole_and_streamed(mesh):
    client = sdk(mesh)
    whole = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=150, temperature=0.8, seed=4,
                                           response_format=_schema_format())
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
    stream = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=150, temperature=0.8, seed=4,
                                            response_format=_schema_format(), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_with_guided_fields(mesh):
    client = sdk(mesh)
    regex = r"[A-Z][a-z]{2,6} [0-9]{2}"
    out = client.completions.create(model=QWEN, prompt="The code is", max_tokens=30, temperature=1.0, seed=1,
                                    extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=QWEN, prompt="Pick one:", max_tokens=10, temperature=1.0, seed=2,
                                    extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert out.choices[0].text in ("alpha", "beta", "gamma")
    out = client.completions.create(model=QWEN, prompt="Answer:", max_tokens=10, temperature=0.0,
                                    extra_body={"structured_outputs": {"grammar": 'root ::= ("ok" | "no") "!"'}})
    assert out.choices[0].text in ("ok!", "no!")
    out = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=150, temperature=0.0,
                                         extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_grpc_structured_output_oneof(mesh):
    sampling = common_pb2.SamplingParams(max_tokens=150, temperature=0.0, json_schema=json.dumps(SCHEMA))
    request = inference_pb2.ChatRequest(model=QWEN, sampling=sampling,
                                        messages=[inference_pb2.ChatMessage(**m) for m in MESSAGES])
    with grpc.insecure_channel(mesh["gateway"].address) as channel:
        chunks = list(inference_pb2_grpc.InferenceStub(channel).Chat(request, timeout=120))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(ch.text for ch in chunks)), SCHEMA)


@pytest.mark.parametrize("body, param", [
    ({"response_format": _schema_format({"type": "object", "properties": {"a": {"type": "strnig"}}})},
     "structured_output.json_schema"),
    ({"extra_body": {"guided_regex": "a(("}}, "structured_output.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "a" |'}}}, "structured_output.grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"extra_body": {"guided_choice": "yes"}}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
])
def test_bad_structured_output_is_a_400_naming_the_field(mesh, body, param):
    client = sdk(mesh)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=5, **body)
    assert param in f"{err.value.param} {err.value}"
    ok = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=3, temperature=0.0)
    assert ok.choices[0].finish_reason in ("stop", "length")
