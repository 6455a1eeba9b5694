"""Tool use in chat: the tools a template renders, the grammar a forced call is held to,
and the parsing of the model's output into function calls.

Two output formats are understood, picked from the model's chat template: Hermes/Qwen
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among the text) and
Llama 3.1's JSON (the whole answer is ``{"name": ..., "parameters": {...}}``, several
separated by ``;``, optionally after ``<|python_tag|>``). A forced call (``tool_choice``
"required" or a named function) is generated under a JSON-schema grammar of llmesh's own
shape, as vLLM does: the arguments object of the named function, or a list of
``{"name", "parameters"}`` objects; so a forced call parses whatever the template's format.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from llmesh.engine.structured_output.spec import StructuredOutputSpec
from llmesh.errors import invalid_argument
from llmesh.v1 import common_pb2, inference_pb2

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def output_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model."""
    if chat_template and _OPEN not in chat_template and ('"parameters"' in chat_template or
                                                          "ipython" in chat_template):
        return LLAMA3_JSON
    return HERMES


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """A chat request's tools, as the template and the parser need them."""

    tools: list[dict[str, Any]]
    """OpenAI's shape ({"type": "function", "function": {...}}), which templates read."""
    forced: str | None
    """None ("auto"), "required", or the name of the function that must be called."""
    parallel: bool = True


def tool_use_of(request: inference_pb2.ChatRequest, parallel: bool = True) -> ToolUse | None:
    """The request's tools, checked (INVALID_ARGUMENT naming the field); None when there
    are none or tool_choice is "none" (the template then shows no tools)."""
    mode = request.tool_choice.WhichOneof("choice")
    choice = getattr(request.tool_choice, mode) if mode else "auto"
    if mode == "mode" and choice not in ("auto", "none", "required"):
        raise invalid_argument(f"tool_choice is {choice!r}; use auto, none, required or a function name")
    if not request.tools:
        if mode is not None and choice != "none":
            raise invalid_argument("tool_choice needs tools: send the functions the model may call")
        return None
    if choice == "none":
        return None
    tools, names = [], set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise invalid_argument(f"tools[{i}].name is empty")
        if tool.name in names:
            raise invalid_argument(f"tools[{i}].name {tool.name!r} is used by two tools")
        names.add(tool.name)
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = _parameters(tool.parameters, i)
        tools.append({"type": "function", "function": function})
    if mode == "function" and choice not in names:
        raise invalid_argument(f"tool_choice names function {choice!r}, which is not in tools "
                               f"({', '.join(sorted(names))})")
    return ToolUse(tools, None if choice == "auto" else choice, parallel)


def _parameters(text: str, i: int) -> dict[str, Any]:
    if not text:
        return {"type": "object", "properties": {}}
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise invalid_argument(f"tools[{i}].parameters is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise invalid_argument(f"tools[{i}].parameters must be a JSON schema object")
    return schema


def forced_spec(use: ToolUse) -> StructuredOutputSpec | None:
    """The grammar that enforces a forced call; None for "auto"."""
    if use.forced is None:
        return None
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in use.tools}
    if use.forced != "required":
        return StructuredOutputSpec.json_schema(by_name[use.forced])
    call = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": params},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, params in by_name.items()]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": call}, "minItems": 1}
    if not use.parallel:
        schema["maxItems"] = 1
    return StructuredOutputSpec.json_schema(schema)


def template_messages(messages: list[inference_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """Extra keys of tool-use messages, in the shape HF chat templates read (arguments as
    an object, as transformers documents; text that is not JSON is passed as it is)."""
    out = []
    for m in messages:
        extra: dict[str, Any] = {}
        if m.tool_calls:
            extra["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                   for c in m.tool_calls]
        if m.tool_call_id:
            extra["tool_call_id"] = m.tool_call_id
        if m.name:
            extra["name"] = m.name
        out.append(extra)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def _call(name: str, arguments: Any) -> common_pb2.ToolCall:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return common_pb2.ToolCall(id="call_" + uuid.uuid4().hex[:24], name=name, arguments=args)


class ToolCallParser:
    """Splits a streamed answer into text and function calls.

    ``feed`` returns the text that can be shown now: text that might still turn out to be
    (the start of) a call is held back until it is known. ``finish`` returns the text held
    back that was not a call, and the calls.
    """

    def __init__(self, use: ToolUse, fmt: str) -> None:
        self._use, self._fmt = use, fmt
        self._names = {t["function"]["name"] for t in use.tools}
        self._held = ""
        self._calls: list[common_pb2.ToolCall] = []
        self._whole_answer = use.forced is not None or fmt == LLAMA3_JSON
        self._started = False

    def feed(self, text: str) -> str:
        self._held += text
        if self._use.forced is not None:
            return ""
        if self._fmt == LLAMA3_JSON:
            if not self._started:
                stripped = self._held.lstrip()
                if not stripped:
                    return ""
                self._started = True
                if not (stripped.startswith("{") or stripped.startswith(_PYTHON_TAG)):
                    self._whole_answer = False  # plain text: no call in this answer
            if self._whole_answer:
                return ""
            shown, self._held = self._held, ""
            return shown
        return self._hermes_text()

    def _hermes_text(self) -> str:
        """Complete ``<tool_call>`` blocks become calls; text outside them is shown."""
        shown = []
        while True:
            start = self._held.find(_OPEN)
            if start < 0:
                keep = _partial_suffix(self._held, _OPEN)
                shown.append(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                return "".join(shown)
            end = self._held.find(_CLOSE, start)
            if end < 0:
                shown.append(self._held[:start])
                self._held = self._held[start:]
                return "".join(shown)
            block = self._held[start + len(_OPEN):end]
            call = self._parse_object(block, "arguments")
            shown.append(self._held[:start])
            if call is None:
                shown.append(self._held[start:end + len(_CLOSE)])  # not a call after all: show it
            else:
                self._calls.append(call)
            self._held = self._held[end + len(_CLOSE):]

    def finish(self) -> tuple[str, list[common_pb2.ToolCall]]:
        held, self._held = self._held, ""
        if self._use.forced is not None and self._use.forced != "required":
            return "", [_call(self._use.forced, held)]
        if self._use.forced == "required":
            calls = self._parse_list(held)
            return ("", calls) if calls else (held, [])
        if self._fmt == LLAMA3_JSON and self._whole_answer:
            calls = self._parse_llama(held)
            return ("", calls) if calls else (held, [])
        return held, self._calls

    def _parse_object(self, text: str, args_key: str) -> common_pb2.ToolCall | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self._names:
            return None
        args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
        return _call(obj["name"], args)

    def _parse_list(self, text: str) -> list[common_pb2.ToolCall]:
        try:
            items = json.loads(text)
        except ValueError:
            return []
        calls = [self._parse_object(json.dumps(item), "parameters") for item in items] \
            if isinstance(items, list) else []
        return calls if calls and all(c is not None for c in calls) else []

    def _parse_llama(self, text: str) -> list[common_pb2.ToolCall]:
        text = text.strip()
        if text.startswith(_PYTHON_TAG):
            text = text[len(_PYTHON_TAG):]
        calls = [self._parse_object(part, "parameters") for part in _split_objects(text)]
        return calls if calls and all(c is not None for c in calls) else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (held back: it may be one)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _split_objects(text: str) -> list[str]:
    """``{...}; {...}`` → the JSON texts (a ``;`` inside a string is not a separator)."""
    decoder = json.JSONDecoder()
    parts, i = [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            break
        try:
            _, end = decoder.raw_decode(text, i)
        except ValueError:
            return [text]
        parts.append(text[i:end])
        i = end
    return parts
