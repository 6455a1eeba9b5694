"""The router's model list (names, windows, replicas), kept fresh in the background.

Every request needs its model's window for the length check; asking the router each
time would add a round trip to every call, so the list is refreshed every few seconds
and read from memory. ListModels itself asks the router each time (``fresh_cards``): it is
rare, and its healthy-replica counts must not lag the router's view. A failed refresh keeps the last list (the router may be
restarting); only a gateway that never got a list answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from llmesh.errors import ServiceError, unavailable
from llmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

LIST_TIMEOUT_S = 5.0
RETRY_UNKNOWN_S = 1.0
"""An unknown model triggers at most one extra refresh per this many seconds."""


class ModelCatalog:
    """Model name → ModelCard, as the router last reported."""

    def __init__(self, router: router_pb2_grpc.RouterStub, router_address: str, refresh_s: float) -> None:
        self._router = router
        self._router_address = router_address
        self._refresh_s = refresh_s
        self._cards: dict[str, router_pb2.ModelCard] = {}
        self._loaded_at: float | None = None
        self._last_try = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Fetch the list now; raises UNAVAILABLE when the router cannot answer."""
        async with self._lock:
            self._last_try = time.monotonic()
            try:
                resp = await self._router.ListModels(router_pb2.RouterListModelsRequest(),
                                                     timeout=LIST_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                raise unavailable(f"the router at {self._router_address} did not list its models "
                                  f"({e.code().name}: {e.details()}); try again shortly") from None
            self._cards = {c.name: c for c in resp.models}
            self._loaded_at = time.monotonic()

    async def cards(self, want: str | None = None) -> dict[str, router_pb2.ModelCard]:
        """The current cards; fetched now if never loaded, or if ``want`` is unknown."""
        if self._loaded_at is None:
            await self.refresh()
        elif want is not None and want not in self._cards and want != "auto" \
                and time.monotonic() - self._last_try >= RETRY_UNKNOWN_S:
            try:
                await self.refresh()
            except Exception as e:  # keep serving from the last list
                log.warning("model list refresh failed", extra={"error": str(e)})
        return self._cards

    async def fresh_cards(self) -> dict[str, router_pb2.ModelCard]:
        """The router's cards as of now (ListModels shows replica health, which changes within
        a health-check interval); the last list when the router cannot answer."""
        try:
            await self.refresh()
        except ServiceError:
            if self._loaded_at is None:
                raise
            log.warning("model list refresh failed; answering from the last list",
                        extra={"router": self._router_address})
        return self._cards

    @property
    def names(self) -> list[str]:
        return list(self._cards)

    def window(self, model: str) -> int:
        card = self._cards.get(model)
        return card.max_model_len if card is not None else 0

    async def run_refresh_loop(self) -> None:
        """Refresh every ``refresh_s`` seconds until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("model list refresh failed", extra={"error": str(e)})
            await asyncio.sleep(self._refresh_s)
