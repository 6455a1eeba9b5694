"""The engine service's watch over its core: health, and a fresh core after a failure.

Health (grpc.health.v1) is NOT_SERVING while the step loop has work but has not advanced
for ``stall_timeout_s``, and from the moment the core fails (a step raised, its process
died) until a fresh core is ready. The failed core's requests have already ended with
UNAVAILABLE naming this engine (AsyncLLM fails them when the core goes). A fresh core is
started at most ``core_restarts`` times per ``core_restart_window_s``; past that budget,
or when the fresh core cannot start, the engine process stops and exits with code 1, so
that whatever supervises it (``llmesh up``, systemd, Kubernetes) restarts the whole
process: an engine that neither serves nor exits would be a silent hole in the fleet.

A fresh core is a new KV cache, so the engine takes a new epoch: the prefix-cache index
drops what the old core held and the router fetches Info again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.errors import EngineClosingError
from llmesh.engine.service.index_link import IndexLink
from llmesh.engine.service.servicer import EngineServicer
from llmesh.grpc_server import GrpcServer

log = logging.getLogger("llmesh.engine")


def new_epoch() -> int:
    """Milliseconds since the epoch: grows across restarts, so the index replaces older state."""
    return time.time_ns() // 1_000_000


class CoreSupervisor:
    def __init__(self, server: GrpcServer, engine: AsyncLLM, servicer: EngineServicer, *,
                 stall_timeout_s: float, restarts: int, restart_window_s: float,
                 link: Callable[[], IndexLink | None] = lambda: None) -> None:
        self.server, self.engine, self.servicer = server, engine, servicer
        self.stall_timeout_s = stall_timeout_s
        self.restarts, self.restart_window_s = restarts, restart_window_s
        self._link = link
        self._restarted_at: collections.deque[float] = collections.deque()
        self.exit_code = 0
        self.stopping: asyncio.Task | None = None
        """The server's shutdown, once the supervisor gave up on the core."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failed = asyncio.Event()
        # Woken the moment the core dies, so health turns NOT_SERVING before a caller that
        # saw its stream fail can ask (polling alone would leave a window of stale SERVING).
        self.engine.on_core_death(lambda _reason: loop.call_soon_threadsafe(failed.set))
        serving = True
        while not self.engine.closing:
            if self.engine.dead is not None:
                failed.clear()
                await self.server.set_serving(False)
                if not await self._replace_core():
                    return
                serving = True
                continue
            stalled = self.engine.has_work and self.engine.seconds_since_progress() > self.stall_timeout_s
            if stalled == serving:
                serving = not stalled
                await self.server.set_serving(serving)
                log.warning("engine step loop %s", "stalled: reporting NOT_SERVING" if stalled else "recovered")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(failed.wait(), min(0.1, self.stall_timeout_s / 4))

    async def _replace_core(self) -> bool:
        """Start a fresh core and report SERVING again; False when the engine gave up and stops."""
        reason = self.engine.dead
        now = time.monotonic()
        while self._restarted_at and now - self._restarted_at[0] > self.restart_window_s:
            self._restarted_at.popleft()
        if len(self._restarted_at) >= self.restarts:
            self._give_up(f"the engine core failed ({reason}) and {len(self._restarted_at)} restart(s) in the "
                          f"last {self.restart_window_s:g}s used the core_restarts budget ({self.restarts})")
            return False
        self._restarted_at.append(now)
        log.error("engine core failed: reporting NOT_SERVING and starting a fresh core",
                  extra={"reason": reason, "restart": len(self._restarted_at), "budget": self.restarts})
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.restart_core)
        except EngineClosingError:
            return False  # a graceful shutdown, not a failure: the exit code stays 0
        except Exception as e:  # noqa: BLE001  (a core that cannot start: the process restart may fix it)
            self._give_up(f"the engine core failed ({reason}) and a fresh core could not start "
                          f"({type(e).__name__}: {e})")
            return False
        epoch = new_epoch()
        self.servicer.epoch = epoch
        link = self._link()
        if link is not None:
            await link.core_restarted(epoch)
        await self.server.set_serving(True)
        log.warning("fresh engine core serving", extra={"seconds": round(time.monotonic() - t0, 2),
                                                        "epoch": epoch, "pid": self.engine.core_pid})
        return True

    def _give_up(self, why: str) -> None:
        log.error("%s: stopping the engine process (exit code 1) so that its supervisor restarts it", why)
        self.exit_code = 1
        self.stopping = asyncio.ensure_future(self.server.stop())
