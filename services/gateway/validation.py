"""Request checks the gateway makes before any engine work.

Pure functions over plain values and protos: each raises ``ServiceError`` with the status
a client should see (NOT_FOUND for an unknown model, INVALID_ARGUMENT otherwise) and a
message that names the field or limit and says what to change. A request that passes
them cannot be refused by the engine for its shape, only for load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.sampling_params import SamplingParams
from llmesh.errors import ServiceError, invalid_argument, not_found, unavailable
from llmesh.sampling_proto import sampling_from_proto
from llmesh.v1 import common_pb2

AUTO = "auto"
"""The model name that lets the router choose between the served models."""
ROLES = ("system", "user", "assistant", "tool")
"""Chat roles the gateway passes to chat templates."""
MAX_REQUEST_ID_CHARS = 128


def check_request_size(nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise invalid_argument(
            f"request is {nbytes} bytes, over the gateway's limit of {limit} bytes "
            "(max_request_bytes); send a shorter prompt or conversation")


def check_prompt_bytes(nbytes: int, limit: int, field: str) -> None:
    """A prompt over ``max_prompt_bytes``, refused before it costs any tokenizing."""
    if nbytes > limit:
        raise invalid_argument(
            f"{field} is {nbytes} bytes, over the gateway's limit of {limit} bytes (max_prompt_bytes); "
            "send a shorter prompt")


def check_stop_limits(proto: common_pb2.SamplingParams, max_count: int, max_chars: int) -> None:
    """Stop strings are matched against every generated token's text: bound their number
    and length (``max_stop_strings``, ``max_stop_chars``)."""
    if len(proto.stop) > max_count:
        raise invalid_argument(
            f"sampling.stop has {len(proto.stop)} strings, over the gateway's limit of {max_count} "
            "(max_stop_strings); send fewer stop strings")
    for i, s in enumerate(proto.stop):
        if len(s) > max_chars:
            raise invalid_argument(
                f"sampling.stop[{i}] has {len(s)} characters, over the gateway's limit of {max_chars} "
                "(max_stop_chars); use a shorter stop string")


PRIORITIES = {common_pb2.Priority.Name(v): v for v in common_pb2.Priority.values()}


def check_priority(value: int) -> None:
    """Protobuf keeps enum numbers it does not know; refuse them rather than guess a class."""
    if value not in PRIORITIES.values():
        names = ", ".join(f"{name} ({v})" for name, v in PRIORITIES.items())
        raise invalid_argument(f"priority {value} is not a Priority value; use one of {names}")


def check_text(text: str, field: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid_argument(
            f"{field} is not valid UTF-8: character {e.start} is a lone surrogate "
            f"({text[e.start]!a}); send well-formed Unicode text") from None


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument(
            f"request_id has {len(request_id)} characters, over {MAX_REQUEST_ID_CHARS}; use a shorter id")
    check_text(request_id, "request_id")
    if any(not c.isprintable() for c in request_id):
        raise invalid_argument("request_id must be printable text (no control characters)")


def resolve_model(requested: str, available: Iterable[str]) -> str:
    """The model a request names: a served model or ``auto`` (an empty name means ``auto``)."""
    names = sorted(available)
    model = requested.strip() or AUTO
    if model == AUTO:
        if not names:
            raise unavailable("no models are being served right now; try again later")
        return AUTO
    if model not in names:
        raise not_found(f"model {model!r} is not served; available models: {', '.join(names) or 'none'} "
                        f"(or {AUTO!r} to let the router choose)")
    return model


def check_prompt_present(kind: str | None, text: str, token_ids: Sequence[int]) -> None:
    """``kind`` is the set member of the ``prompt`` oneof (None when unset)."""
    if kind is None or (kind == "text" and not text) or (kind == "token_ids" and not token_ids):
        raise invalid_argument("prompt is empty: set prompt text or prompt token_ids")
    if kind == "text":
        check_text(text, "prompt.text")


def check_token_ids(token_ids: Sequence[int], vocab_size: int, model: str, field: str) -> None:
    if not token_ids or max(token_ids) < vocab_size:  # max() runs in C: a long prompt costs no Python loop
        return
    for i, t in enumerate(token_ids):
        if t >= vocab_size:
            raise invalid_argument(
                f"{field}[{i}] = {t} is outside model {model!r}'s vocabulary [0, {vocab_size}); "
                "use ids from Tokenize for this model")


def check_messages(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, content) pairs → the dicts chat templates read."""
    if not messages:
        raise invalid_argument("messages is empty: send at least one {role, content} message")
    out = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise invalid_argument(
                f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        check_text(content, f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def to_sampling_params(proto: common_pb2.SamplingParams, max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams for a request, validated by the engine's own rules.

    ``max_tokens`` is used when the request leaves it unset. An out-of-range field is
    INVALID_ARGUMENT naming ``sampling.<field>``.
    """
    for i, s in enumerate(proto.stop):
        check_text(s, f"sampling.stop[{i}]")
    try:
        return sampling_from_proto(proto, default_max_tokens=max_tokens)
    except InvalidRequestError as e:
        raise sampling_error(e) from None


def sampling_error(e: InvalidRequestError) -> ServiceError:
    """INVALID_ARGUMENT for a sampling field, named as the client spells it."""
    field = e.field or "params"
    message = str(e)
    if message.startswith(field):
        return invalid_argument(f"sampling.{message}")
    return invalid_argument(f"sampling.{field}: {message}")


def fit_window(prompt_tokens: int, requested_max_tokens: int | None, default_max_tokens: int,
               window: int, model: str) -> int:
    """The max_tokens to send: the request's, or the default capped by the window.

    ``window`` is the model's max_model_len (prompt + output); 0 means unknown, and then
    only the engine checks the length.
    """
    if window <= 0:
        return requested_max_tokens if requested_max_tokens is not None else default_max_tokens
    if prompt_tokens >= window:
        raise invalid_argument(
            f"prompt has {prompt_tokens} tokens but the window of model {model!r} is {window} tokens "
            f"(prompt + output); shorten the prompt by at least {prompt_tokens - window + 1} tokens")
    room = window - prompt_tokens
    if requested_max_tokens is None:
        return min(default_max_tokens, room)
    if requested_max_tokens > room:
        raise invalid_argument(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({requested_max_tokens}) = "
            f"{prompt_tokens + requested_max_tokens} tokens exceeds the window of model {model!r} ({window} tokens); "
            f"lower max_tokens to at most {room} or shorten the prompt")
    return requested_max_tokens


def sampling_proto_with(proto: common_pb2.SamplingParams, max_tokens: int) -> common_pb2.SamplingParams:
    """A copy of the request's sampling with the effective max_tokens filled in."""
    out = common_pb2.SamplingParams()
    out.CopyFrom(proto)
    out.max_tokens = max_tokens
    return out
