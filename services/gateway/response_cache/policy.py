"""Whether one request is looked up and stored: the API key's policy and the request's mode.

A key's policy is a short string kept in its record (``llmesh keys create
--response-cache``): ``""`` follows the gateway (``--response-cache``, its TTL), ``off``
never caches the key's requests, ``on`` caches them with the gateway's TTL, ``ttl=N``
caches them for N seconds. A request then asks for ``use`` (the default), ``bypass``
(neither look up nor store) or ``refresh`` (skip the lookup, store the fresh answer) —
LiteLLM's ``no-cache`` — through ``GenerateRequest.cache`` or the HTTP header
``x-llmesh-cache``. ``off`` on the key wins over any request: a tenant whose answers must
not be kept asks for it once, on its keys.
"""

from __future__ import annotations

import dataclasses
import math

from llmesh.errors import invalid_argument
from llmesh.v1 import inference_pb2

MODES = {"use": inference_pb2.RESPONSE_CACHE_MODE_USE, "bypass": inference_pb2.RESPONSE_CACHE_MODE_BYPASS,
         "refresh": inference_pb2.RESPONSE_CACHE_MODE_REFRESH}
"""The request modes by the names the HTTP header uses."""


@dataclasses.dataclass(frozen=True)
class KeyPolicy:
    enabled: bool | None = None
    """None: as the gateway says."""
    ttl_s: float | None = None
    """None: the gateway's TTL."""


def parse_key_policy(text: str) -> KeyPolicy:
    """``""``, ``default``, ``off``, ``on`` or ``ttl=<seconds>``; ValueError otherwise."""
    value = text.strip().lower()
    if value in ("", "default"):
        return KeyPolicy()
    if value == "off":
        return KeyPolicy(enabled=False)
    if value == "on":
        return KeyPolicy(enabled=True)
    name, _, number = value.partition("=")
    if name == "ttl":
        try:
            ttl = float(number)
        except ValueError:
            ttl = math.nan
        if math.isfinite(ttl) and ttl > 0:
            return KeyPolicy(enabled=True, ttl_s=ttl)
    raise ValueError(f"response cache policy must be 'default', 'off', 'on' or 'ttl=<seconds>' (seconds > 0), "
                     f"got {text!r}")


def check_mode(mode: int) -> None:
    """A request's ``cache`` field must name a ResponseCacheMode (INVALID_ARGUMENT otherwise)."""
    if mode not in inference_pb2.ResponseCacheMode.values():
        raise invalid_argument(f"cache: {mode} is not a ResponseCacheMode (use "
                               f"{', '.join(inference_pb2.ResponseCacheMode.keys())})")


def parse_mode_header(value: str | None) -> int:
    """The ``x-llmesh-cache`` header's mode; ValueError naming the allowed values."""
    if value is None:
        return inference_pb2.RESPONSE_CACHE_MODE_UNSPECIFIED
    mode = MODES.get(value.strip().lower())
    if mode is None:
        raise ValueError(f"x-llmesh-cache must be one of {', '.join(MODES)}, got {value!r}")
    return mode


@dataclasses.dataclass(frozen=True)
class Decision:
    lookup: bool
    store: bool
    ttl_s: float


def decide(gateway_ttl_s: float, key_policy: str, mode: int) -> Decision | None:
    """What to do for one deterministic request; None: leave the cache alone. A key record
    whose policy no longer parses (written by hand) is treated as ``off``: storing what its
    owner may have meant to keep out is the worse mistake."""
    try:
        policy = parse_key_policy(key_policy)
    except ValueError:
        return None
    if policy.enabled is False or mode == inference_pb2.RESPONSE_CACHE_MODE_BYPASS:
        return None
    ttl = policy.ttl_s if policy.ttl_s is not None else gateway_ttl_s
    return Decision(lookup=mode != inference_pb2.RESPONSE_CACHE_MODE_REFRESH, store=True, ttl_s=ttl)
