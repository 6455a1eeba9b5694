"""OpenAI request bodies → the gateway's own request messages.

``/v1/chat/completions`` becomes a ``ChatRequest`` and ``/v1/completions`` a
``GenerateRequest``; from there both fronts share one path (validation, templates,
defaults, limits). This module only checks what is particular to the JSON shape: the
types of the fields, which OpenAI fields exist here, and the spelling of their aliases.
A field llmesh does not implement is refused with 400 naming it, never ignored.
Ranges (temperature >= 0, top_p in (0, 1], ...) are checked later by the engine's own
SamplingParams rules, exactly as for gRPC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmesh.engine.sampling_params import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_N
from llmesh.gateway.http_errors import HttpError
from llmesh.gateway.openai_structured import (
    STRUCTURED_FIELDS,
    TOOL_FIELDS,
    apply_structured_output,
    apply_tools,
    message_tool_fields,
)
from llmesh.v1 import common_pb2, inference_pb2

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INT_FIELDS = ("top_k", "seed", "min_tokens")
_COMMON = {"model", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "n", "user",
           "logprobs", "ignore_eos", "stop_token_ids", "speculative", *_FLOAT_FIELDS, *_INT_FIELDS, *STRUCTURED_FIELDS}
CHAT_FIELDS = frozenset(_COMMON | TOOL_FIELDS | {"messages", "top_logprobs", "logit_bias"})
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "best_of", "suffix", "logit_bias"})
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limit for /v1/completions' integer ``logprobs``."""
ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role; chat templates know only "system"."""


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """What the HTTP front needs besides the request message."""

    message: inference_pb2.ChatRequest | inference_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    """stream_options.include_usage: a last chunk with usage and no choices."""
    logprobs: bool
    user: str
    echo: bool = False
    """Completions: the answer starts with the prompt text."""


def _bad(message: str, param: str | None) -> HttpError:
    return HttpError(400, message, param=param)


def _check_unknown(body: dict[str, Any], known: frozenset[str], endpoint: str) -> None:
    for key in body:
        if key not in known:
            raise _bad(f"{key!r} is not supported by llmesh's {endpoint}; supported fields: "
                       f"{', '.join(sorted(known))}", key)


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{key} must be a number, got {value!r}", key)
    try:
        return float(value)
    except OverflowError:  # an integer past any float: out of every sampling field's range
        raise _bad(f"{key} is out of range (too large for a number)", key) from None


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key} must be an integer, got {value!r}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}", key)
    return value


def _only(body: dict, key: str, allowed: tuple, why: str) -> None:
    """A field accepted only at the value(s) that mean 'the default behaviour'."""
    if key in body and body[key] is not None and body[key] not in allowed:
        raise _bad(f"{key}={body[key]!r} is not supported: {why}", key)


def _set(sampling: common_pb2.SamplingParams, key: str, value: int) -> None:
    try:
        setattr(sampling, key, value)
    except ValueError:
        raise _bad(f"{key} is out of range (too large for a number)", key) from None


def _sampling(body: dict) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams()
    max_tokens, max_completion = _integer(body, "max_tokens"), _integer(body, "max_completion_tokens")
    # OpenAI's newer name wins when both are sent (max_tokens is deprecated in chat).
    name, limit = ("max_completion_tokens", max_completion) if max_completion is not None \
        else ("max_tokens", max_tokens)
    if limit is not None:
        if limit < 1:
            raise _bad(f"{name} must be >= 1, got {limit}", name)
        _set(out, "max_tokens", limit)
    n = _integer(body, "n")
    if n is not None:
        if not 1 <= n <= MAX_N:
            raise _bad(f"n must be in [1, {MAX_N}], got {n}", "n")
        out.n = n
    _logit_bias(body.get("logit_bias"), out)
    for key in _FLOAT_FIELDS:
        value = _number(body, key)
        if value is not None:
            setattr(out, key, value)
    top_k = _integer(body, "top_k")
    if top_k is not None:
        _set(out, "top_k", 0 if top_k == -1 else top_k)  # -1 is vLLM's spelling of "no top-k"
    seed = _integer(body, "seed")
    if seed is not None:
        if seed < 0:
            raise _bad(f"seed must be >= 0, got {seed}", "seed")
        _set(out, "seed", seed)
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None:
        if min_tokens < 0:
            raise _bad(f"min_tokens must be >= 0, got {min_tokens}", "min_tokens")
        _set(out, "min_tokens", min_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        out.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out.stop.extend(stop)
    elif stop is not None:
        raise _bad("stop must be a string or a list of strings", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in stop_ids):
            raise _bad("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
        out.stop_token_ids.extend(stop_ids)
    out.ignore_eos = _flag(body, "ignore_eos")
    if body.get("speculative") is not None:  # an engine running speculative decoding may use it (default)
        out.speculative = _flag(body, "speculative")
    apply_structured_output(body, out)
    return out


def _logit_bias(value: Any, out: common_pb2.SamplingParams) -> None:
    """``{"token id": bias}`` (JSON keys are strings) → the proto's map; ranges are the engine's rules."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad("logit_bias must be an object mapping token ids to biases", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise _bad(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed", "logit_bias")
    for key, bias in value.items():
        if not isinstance(key, str) or not key.isdigit():
            raise _bad(f"logit_bias keys must be token ids (non-negative integers), got {key!r}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
            raise _bad(f"logit_bias[{key}] must be a number in [-100, 100], got {bias!r}", "logit_bias")
        token = int(key)
        if token >= 2**32:
            raise _bad(f"logit_bias key {key} is not a token id", "logit_bias")
        out.logit_bias[token] = float(bias)


def _common(body: Any, known: frozenset[str], endpoint: str) -> tuple[dict, bool, bool, str]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _check_unknown(body, known, endpoint)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: a name from GET /v1/models, or 'auto' to let the router choose", "model")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options supports only {'include_usage': bool}", "stream_options")
        include_usage = _flag(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string", "user")
    return body, stream, include_usage, user or ""


def _content(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content[{j}] is of type {kind!r}; llmesh serves text only "
                           "(content parts of type 'text')", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(value: Any) -> list[inference_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        extra = set(m) - {"role", "content", "tool_calls", "tool_call_id", "name"}
        if extra:
            raise _bad(f"messages[{i}] has unsupported keys {sorted(extra)}: llmesh takes role, content, "
                       "tool_calls, tool_call_id and name", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role must be a string", f"messages[{i}].role")
        content = m.get("content")
        message = inference_pb2.ChatMessage(role=ROLE_ALIASES.get(role, role),
                                            content=_content(content if content is not None else "", i))
        message_tool_fields(m, i, message)
        out.append(message)
    return out


def parse_chat(body: Any) -> ParsedRequest:
    """A ``POST /v1/chat/completions`` body → ChatRequest (raises HttpError 400)."""
    body, stream, include_usage, user = _common(body, CHAT_FIELDS, "/v1/chat/completions")
    sampling = _sampling(body)
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs")
    if top is not None:
        if not logprobs:
            raise _bad("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
    if logprobs:
        sampling.logprobs = top or 0
    message = inference_pb2.ChatRequest(model=body["model"], messages=_messages(body.get("messages")),
                                        sampling=sampling)
    apply_tools(body, message)
    return ParsedRequest(message, stream, include_usage, logprobs, user)


def _prompt(value: Any) -> str | list[int]:
    """A completion prompt: text or token ids, alone or as a batch of one."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(t < 0 for t in value):
            raise _bad("prompt token ids must be >= 0", "prompt")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise _bad(f"prompt holds {len(value)} prompts; llmesh takes one prompt per request", "prompt")
    raise _bad("prompt must be a string or a list of token ids", "prompt")


def parse_completion(body: Any) -> ParsedRequest:
    """A ``POST /v1/completions`` body → GenerateRequest (raises HttpError 400)."""
    body, stream, include_usage, user = _common(body, COMPLETION_FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise _bad("prompt is required (a string or a list of token ids)", "prompt")
    echo = _flag(body, "echo")
    if body.get("best_of") is not None and body["best_of"] != (body.get("n") or 1):
        raise _bad("best_of is supported only equal to n: llmesh returns every choice it generates", "best_of")
    _only(body, "suffix", ("",), "llmesh does not insert completions")
    sampling = _sampling(body)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) \
                or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise _bad(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]", "logprobs")
        sampling.logprobs = logprobs
        if echo:  # the echoed prompt's tokens come with their logprobs too
            sampling.prompt_logprobs = logprobs
    message = inference_pb2.GenerateRequest(model=body["model"], sampling=sampling, echo=echo)
    prompt = _prompt(body["prompt"])
    if isinstance(prompt, str):
        message.text = prompt
    else:
        message.token_ids.ids.extend(prompt)
    return ParsedRequest(message, stream, include_usage, logprobs is not None, user, echo)


def parse_tokenize(body: Any) -> inference_pb2.TokenizeRequest:
    """A ``POST /tokenize`` body (vLLM's: model with prompt or messages) → TokenizeRequest."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _check_unknown(body, frozenset({"model", "prompt", "messages", "add_special_tokens"}), "/tokenize")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: a name from GET /v1/models", "model")
    out = inference_pb2.TokenizeRequest(model=model)
    if body.get("messages") is not None:
        out.messages.extend(_messages(body["messages"]))
    elif isinstance(body.get("prompt"), str):
        out.text = body["prompt"]
    else:
        raise _bad("send prompt (a string) or messages", "prompt")
    if body.get("add_special_tokens") is not None:
        out.add_special_tokens = _flag(body, "add_special_tokens")
    return out


def parse_detokenize(body: Any) -> inference_pb2.DetokenizeRequest:
    """A ``POST /detokenize`` body (vLLM's: model and tokens) → DetokenizeRequest."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _check_unknown(body, frozenset({"model", "tokens"}), "/detokenize")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: a name from GET /v1/models", "model")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                               for t in tokens):
        raise _bad("tokens must be a list of token ids (non-negative integers)", "tokens")
    return inference_pb2.DetokenizeRequest(model=model, token_ids=tokens)
