"""``POST /v1/embeddings`` bodies ↔ the gateway's EmbedRequest / EmbedResponse (OpenAI's shape).

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists;
``encoding_format`` is ``float`` (JSON numbers) or ``base64`` (the packed little-endian
float32 bytes, base64-encoded: what OpenAI's SDK asks for by default and decodes itself).
A field llmesh does not implement is refused with 400 naming it, never ignored. The
``x-llmesh-cache`` header asks the embedding cache to ``use``, ``bypass`` or ``refresh``
(docs/response-cache.md); the answer's header of that name says ``hit``, ``partial`` or ``miss``.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from llmesh.gateway.http_errors import HttpError
from llmesh.gateway.response_cache.policy import parse_mode_header
from llmesh.v1 import engine_pb2, inference_pb2

EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
ENCODINGS = ("float", "base64")


def _bad(message: str, param: str) -> HttpError:
    return HttpError(400, message, param=param)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_embeddings(body: Any, cache_header: str | None = None) -> tuple[inference_pb2.EmbedRequest, str]:
    """The EmbedRequest of a /v1/embeddings body (and its ``x-llmesh-cache`` header's mode)
    and its encoding_format."""
    try:
        mode = parse_mode_header(cache_header)
    except ValueError as e:
        raise _bad(str(e), "x-llmesh-cache") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "body")
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise _bad(f"unsupported field(s) for /v1/embeddings: {', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: the name of a model served with a pooling mode", "model")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise _bad(f"encoding_format must be one of {', '.join(ENCODINGS)}, got {encoding!r}", "encoding_format")
    msg = inference_pb2.EmbedRequest(model=model, cache=mode)
    raw = body.get("input")
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif _is_ids(raw) and raw:
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise _bad("input must be a non-empty string, list of strings, list of token ids or list of token-id lists",
                   "input")
    for i, x in enumerate(items):
        if isinstance(x, str):
            msg.inputs.add(text=x)
        elif _is_ids(x):
            if any(t < 0 or t >= 1 << 32 for t in x):
                raise _bad(f"input[{i}] has a token id outside [0, 2^32)", "input")
            msg.inputs.add().token_ids.ids.extend(x)
        else:
            raise _bad(f"input[{i}] must be a string or a list of token ids", "input")
    dims = body.get("dimensions")
    if dims is not None:
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            raise _bad(f"dimensions must be an integer ≥ 1, got {dims!r}", "dimensions")
        msg.dimensions = dims
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")
    return msg, encoding


def embeddings_body(resp: engine_pb2.EmbedResponse, encoding: str) -> dict[str, Any]:
    """OpenAI's response object: one ``data`` entry per input, in input order."""
    data = []
    for e in resp.data:
        if encoding == "base64":
            value: Any = base64.b64encode(e.vector).decode()
        else:
            value = np.frombuffer(e.vector, "<f4").tolist()
        data.append({"object": "embedding", "index": e.index, "embedding": value})
    tokens = resp.usage.prompt_tokens
    return {"object": "list", "data": data, "model": resp.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def cache_outcome(resp: engine_pb2.EmbedResponse) -> str:
    """The ``x-llmesh-cache`` response header: ``hit`` (every vector from the embedding
    cache), ``partial`` (some) or ``miss`` (none, also when the cache is off or bypassed)."""
    if resp.cached_inputs and resp.cached_inputs == len(resp.data):
        return "hit"
    return "partial" if resp.cached_inputs else "miss"
