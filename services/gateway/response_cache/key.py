"""What makes two requests the same answer: the response cache's key.

Only requests whose output is a function of their inputs are cached: greedy ones
(temperature 0) and sampled ones with a seed (the engine's per-request generator makes a
seeded request's tokens independent of whatever else is batched). The key covers every
input of that function, as the engine sees it: the tenant, the model and its revision
(``revision``), the prompt's token ids after the chat template (tool definitions are
rendered into it), the effective sampling (after the model's generation defaults and the
window's max_tokens: every field, logit_bias, stop strings, n, logprobs, seed and
structured-output constraints included) and the API shape (completion or chat).

What the fronts do to the stream afterwards (parsing tool calls, echo, OpenAI's JSON,
request ids) is applied again to a replayed stream for the request at hand, so it is not
in the key: two requests that differ only there share one entry.

The digest is an HMAC-SHA256 keyed by the mesh secret (or the key pepper), so that a
reader of the cache's Redis cannot confirm a guessed prompt; fields are length-prefixed
so that no two different inputs serialize alike.

Embeddings are keyed per input (``embedding_key``) with the same digest over the same
kind of fields: a batch's inputs are looked up, and stored, one by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Sequence

from llmesh.v1 import common_pb2

FORMAT = b"llmesh-response-cache-v1"
"""Changes whenever what an entry holds changes shape (old entries then simply miss)."""
EMBEDDING_FORMAT = b"llmesh-embedding-cache-v1"
"""As FORMAT, for one input's vector (packed little-endian float32)."""


def deterministic(sampling: common_pb2.SamplingParams) -> bool:
    """Whether the engine's output is determined by the request: greedy, or seeded."""
    return (sampling.HasField("temperature") and sampling.temperature == 0.0) or sampling.HasField("seed")


@dataclasses.dataclass(frozen=True)
class CacheKey:
    tenant: str
    model: str
    digest: str
    """Hex HMAC of every input (``cache_key``)."""


def cache_key(secret: bytes, *, tenant: str, model: str, revision: str, shape: str,
              prompt_token_ids: Sequence[int], sampling: common_pb2.SamplingParams) -> CacheKey:
    return CacheKey(tenant, model, _digest(secret, FORMAT, tenant, model, revision, shape, prompt_token_ids,
                                           sampling.SerializeToString(deterministic=True)))


def embedding_key(secret: bytes, *, tenant: str, model: str, revision: str, token_ids: Sequence[int],
                  dimensions: int | None) -> CacheKey:
    """One input of an embedding call: its vector is a function of the model (its pooling
    and normalization are engine options, in the revision), the token ids and the
    truncation the request asks for. Every other request field (priority, request id,
    the batch it came in) leaves the vector alone."""
    options = struct.pack("<I", dimensions or 0)
    return CacheKey(tenant, model, _digest(secret, EMBEDDING_FORMAT, tenant, model, revision, "embedding",
                                           token_ids, options))


def _digest(secret: bytes, fmt: bytes, tenant: str, model: str, revision: str, shape: str,
            token_ids: Sequence[int], options: bytes) -> str:
    ids = struct.pack(f"<{len(token_ids)}I", *token_ids)
    parts = (fmt, tenant.encode(), model.encode(), revision.encode(), shape.encode(), ids, options)
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(struct.pack("<Q", len(part)))
        mac.update(part)
    return mac.hexdigest()
