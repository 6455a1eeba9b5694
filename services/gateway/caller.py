"""Who is calling: the one place authentication plugs into the gateway.

Every Inference handler (gRPC or HTTP) starts with ``caller = await authenticator.authenticate(context)``
and then reads only the ``Caller``: which models it may use, its tier (the default
priority and an ``auto`` policy input) and its prefix-cache salt. Without API keys every
call is the anonymous caller, who may use every model. An authenticator that checks
``authorization: Bearer <key>`` metadata raises ``ServiceError(UNAUTHENTICATED, ...)``
and returns the key's Caller; rate limits hang off the same call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated identity of one call."""

    key_id: str = ""
    """Id of the API key (never the key itself); empty for the anonymous caller."""
    tenant: str = ""
    tier: str = ""
    """e.g. "interactive" or "batch"; empty leaves the request's own priority."""
    allowed_models: frozenset[str] | None = None
    """Models this caller may use; None means all of them."""
    cache_salt: str = ""
    """Prefix-cache namespace: callers with different salts never share cached blocks."""
    rpm: int = 0
    """Requests per minute this key may start; 0 means unlimited (likewise tpm, concurrency)."""
    tpm: int = 0
    """Tokens per minute (prompt + max_tokens reserved at admission, settled at the end)."""
    concurrency: int = 0
    """Streams this key may have open at once."""
    response_cache: str = ""
    """The key's response cache policy ("" follows the gateway; see ``response_cache.policy``)."""

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


ANONYMOUS = Caller()


class CallContext(Protocol):
    """What the gateway reads of a call, whichever front it came through: a gRPC
    ``ServicerContext`` is one, and the HTTP front passes its own (``HttpCallContext``)."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None:
        """The call's metadata as (lower-case key, value) pairs (HTTP: its headers)."""
        ...

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline; None without one."""
        ...


class Authenticator(Protocol):
    async def authenticate(self, context: CallContext) -> Caller:
        """The caller of this call, or raise ServiceError (UNAUTHENTICATED, PERMISSION_DENIED)."""
        ...


class NoAuth:
    """Every call is the anonymous caller (local use, tests)."""

    async def authenticate(self, context: CallContext) -> Caller:
        return ANONYMOUS
