"""The structured-output and tool fields of OpenAI request bodies → the gateway's protos.

Structured output is asked for in any one of OpenAI's ``response_format`` (``json_object``
or ``json_schema``), vLLM's older extra fields (``guided_json``, ``guided_regex``,
``guided_choice``, ``guided_grammar``) or its newer ``structured_outputs`` object; tools
in ``tools`` / ``tool_choice`` / ``parallel_tool_calls``. Each malformed field is a 400
naming it; whether a schema, regex or grammar actually parses is the engine's check
(INVALID_ARGUMENT naming ``structured_output.<kind>``).
"""

from __future__ import annotations

import json
from typing import Any

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.structured_output.spec import StructuredOutputSpec
from llmesh.gateway.http_errors import HttpError
from llmesh.sampling_proto import structured_output_to_proto
from llmesh.v1 import common_pb2, inference_pb2

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_FIELDS = frozenset({"response_format", "structured_outputs", *GUIDED_FIELDS})
TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
_STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_object"}


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, message, param=param)


def _spec(kind: str, value: Any, param: str) -> StructuredOutputSpec:
    try:
        if kind == "json_schema":
            if not isinstance(value, (dict, str)):
                raise _bad(f"{param} must be a JSON schema (an object)", param)
            return StructuredOutputSpec("json_schema", value if isinstance(value, str) else json.dumps(value))
        if kind == "choice":
            if not isinstance(value, list):
                raise _bad(f"{param} must be a list of strings", param)
            return StructuredOutputSpec("choice", choices=tuple(value))
        if kind == "json_object":
            if value is not True:
                raise _bad(f"{param} must be true", param)
            return StructuredOutputSpec("json_object")
        if not isinstance(value, str):
            raise _bad(f"{param} must be a string", param)
        return StructuredOutputSpec(kind, value)
    except InvalidRequestError as e:
        raise _bad(f"{param}: {e}", param) from None


def _response_format(fmt: Any) -> StructuredOutputSpec | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("response_format must be an object with a type (text, json_object or json_schema)",
                   "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise _bad("response_format.json_schema.schema is missing: send "
                       '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                       "response_format.json_schema.schema")
        return _spec("json_schema", inner["schema"], "response_format.json_schema.schema")
    raise _bad(f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
               "response_format")


def apply_structured_output(body: dict[str, Any], sampling: common_pb2.SamplingParams) -> None:
    """Set ``sampling``'s structured_output from whichever field of ``body`` asks for it."""
    found: list[tuple[str, StructuredOutputSpec | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    for key in GUIDED_FIELDS:
        if body.get(key) is not None:
            kind = {"guided_json": "json_schema"}.get(key, key.removeprefix("guided_"))
            found.append((key, _spec(kind, body[key], key)))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("structured_outputs must be an object", "structured_outputs")
        unknown = sorted(set(so) - set(_STRUCTURED_OUTPUTS_KEYS))
        if unknown:
            raise _bad(f"structured_outputs has unsupported keys {unknown}; supported: "
                       f"{', '.join(sorted(_STRUCTURED_OUTPUTS_KEYS))}", "structured_outputs")
        for key, value in so.items():
            if value is not None:
                found.append((f"structured_outputs.{key}",
                              _spec(_STRUCTURED_OUTPUTS_KEYS[key], value, f"structured_outputs.{key}")))
    asked = [(name, spec) for name, spec in found if spec is not None]
    if len(asked) > 1:
        raise _bad(f"{' and '.join(n for n, _ in asked)} each constrain the output; send one of them", asked[1][0])
    if asked:
        structured_output_to_proto(asked[0][1], sampling)


def apply_tools(body: dict[str, Any], message: inference_pb2.ChatRequest) -> None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` onto a ChatRequest."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools must be a list of {type: function, function: {...}} objects", "tools")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
                else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}",
                           f"tools[{i}]")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
            description = fn.get("description") or ""
            if not isinstance(description, str):
                raise _bad(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
            message.tools.add(name=fn["name"], description=description,
                              parameters=json.dumps(params) if params is not None else "")
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        message.tool_choice.mode = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad('tool_choice must be "none", "auto", "required" or '
                       '{"type": "function", "function": {"name": ...}}', "tool_choice")
        message.tool_choice.function = fn["name"]
    elif choice is not None:
        raise _bad('tool_choice must be "none", "auto", "required" or an object naming a function', "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
        message.parallel_tool_calls = parallel


def message_tool_fields(m: dict[str, Any], i: int, out: inference_pb2.ChatMessage) -> None:
    """An assistant message's ``tool_calls`` and a tool message's ``tool_call_id``/``name``."""
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _bad(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments", ""), str):
                raise _bad(f"messages[{i}].tool_calls[{j}] must be {{id, type: function, function: "
                           "{name, arguments (a JSON string)}}", f"messages[{i}].tool_calls[{j}]")
            out.tool_calls.add(id=str(call.get("id") or ""), name=fn["name"], arguments=fn.get("arguments", ""))
    for key in ("tool_call_id", "name"):
        value = m.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise _bad(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}")
            setattr(out, key, value)
